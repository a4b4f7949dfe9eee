"""NVIDIA AIPerf and kvlab's Locust measurement agree on TTFT and ITL for the same load.

Optional: AIPerf is a large separate install (see loadtests/README.md). Set KVLAB_AIPERF to its
`aiperf` executable (installed in its own virtual environment) to run this test; it builds a small
word-level Hugging Face tokenizer with that environment's python, since AIPerf needs one to make
prompts and nothing here may download one.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from loadtests.llm_measure import stream_request

AIPERF = os.environ.get("KVLAB_AIPERF")
pytestmark = pytest.mark.skipif(not AIPERF or not Path(AIPERF).is_file(),
                                reason="set KVLAB_AIPERF to an aiperf executable to compare with NVIDIA AIPerf")

TOKENIZER_SCRIPT = """
import sys
from pathlib import Path
import aiperf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
corpus = Path(aiperf.__file__).parent / "dataset/generator/assets/shakespeare.txt"
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train([str(corpus)], trainers.WordLevelTrainer(special_tokens=["[UNK]"], vocab_size=20000))
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(sys.argv[1])
"""
SCALE, REQUESTS, ISL, OSL = 5.0, 8, 800, 40


def _aiperf(worker_url: str, out: Path) -> dict:
    tokenizer = out / "tokenizer"
    subprocess.run([str(Path(AIPERF).with_name("python")), "-c", TOKENIZER_SCRIPT, str(tokenizer)], check=True,
                   capture_output=True, timeout=120)
    cmd = [AIPERF, "profile", "--model", "Llama-3.1-8B", "--url", worker_url, "--endpoint-type", "chat",
           "--streaming", "--tokenizer", str(tokenizer), "--isl", str(ISL), "--isl-stddev", "0", "--osl", str(OSL),
           "--extra-inputs", "ignore_eos:true", "--concurrency", "1", "--request-count", str(REQUESTS),
           "--artifact-dir", str(out / "aiperf"), "--ui-type", "none", "--random-seed", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (export,) = (out / "aiperf").rglob("profile_export_aiperf.json")
    return json.loads(export.read_text())


def _metric(export: dict, name: str, stat: str) -> float:
    """An AIPerf metric in seconds (its JSON export gives ms), found by tag wherever it sits."""
    records = export.get("records", export)
    entry = records.get(name) if isinstance(records, dict) else None
    if entry is None:
        entry = next(m for m in records if m.get("tag") == name)
    return float(entry[stat]) / 1000.0


def test_aiperf_and_kvlab_measure_the_same_ttft_and_itl(start_worker, tmp_path):
    worker = start_worker(time_scale=SCALE)
    export = _aiperf(worker.url, tmp_path)
    prompt_tokens = worker.metric("vllm:request_prompt_tokens_sum") / worker.metric("vllm:request_prompt_tokens_count")
    ours = [stream_request(worker.http, "/v1/completions",
                           {"model": "Llama-3.1-8B", "prompt": [2000 + i] * round(prompt_tokens), "max_tokens": OSL,
                            "ignore_eos": True}) for i in range(REQUESTS)]
    assert all(r.ok for r in ours)
    ttft = statistics.mean(r.ttft_s for r in ours)
    itl = statistics.mean(statistics.mean(r.gaps_s) for r in ours)
    assert _metric(export, "time_to_first_token", "avg") == pytest.approx(ttft, rel=0.15)
    assert _metric(export, "inter_token_latency", "avg") == pytest.approx(itl, rel=0.10)
