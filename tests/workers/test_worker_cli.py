"""`kvlab worker`: flags and cluster-spec slots become a WorkerConfig; the process serves and stops cleanly."""
import argparse
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import interruptible
from workers import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_become_the_worker_config():
    config, port = cli.config_from_args(parse(
        "--model", "Llama-3.1-70B", "--gpu", "H200", "--tp", "2", "--role", "decode", "--port", "9001",
        "--kv-link", "RoCE-400G", "--num-blocks", "512", "--max-waiting", "8", "--time-scale", "2",
        "--served-model-name", "llama-70b", "--model-alias", "a", "--model-alias", "b",
        "--kv-events-endpoint", "tcp://127.0.0.1:5557"))
    assert port == 9001
    assert (config.model, config.gpu, config.tp, config.role) == ("Llama-3.1-70B", "H200", 2, "decode")
    assert (config.kv_link, config.time_scale, config.engine.num_blocks, config.engine.max_waiting) == (
        "RoCE-400G", 2.0, 512, 8)
    assert config.accepted_models == {"llama-70b", "Llama-3.1-70B", "a", "b"}
    assert config.worker_id == "decode-9001" and config.kv_events_endpoint == "tcp://127.0.0.1:5557"


def test_defaults_without_flags():
    config, port = cli.config_from_args(parse())
    assert port == cli.DEFAULT_PORT
    assert (config.model, config.gpu, config.role) == ("Llama-3.1-8B", "H100-SXM", "both")
    assert config.engine.num_blocks is None


def test_spec_slot_sets_the_config_and_given_flags_override_it():
    config, port = cli.config_from_args(parse("--spec", "tiny-test", "--worker-id", "both-1", "--time-scale", "3"))
    assert port == 18101 and config.worker_id == "both-1"
    e = config.engine
    assert (e.role, e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens) == ("both", 8192, 64, 2048)
    assert config.time_scale == 3.0
    with pytest.raises(ValueError, match="no worker"):
        cli.config_from_args(parse("--spec", "tiny-test", "--worker-id", "nope-0"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_process_serves_then_shuts_down_cleanly_on_signal(free_tcp_port, sig):
    port = free_tcp_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "worker", "--port", str(port), "--num-blocks", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=interruptible)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "worker did not come up"
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"model": "Llama-3.1-8B", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Application shutdown complete" in output
    assert proc.returncode in (0, -sig, 128 + sig)   # uvicorn re-raises the signal after a clean shutdown


def test_unknown_gpu_exits_with_an_error_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "kvlab.cli", "worker", "--gpu", "TPU-v9"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "unknown gpu 'TPU-v9'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_spec_decode_worker_trusts_exactly_the_specs_prefill_workers():
    config, _ = cli.config_from_args(parse("--spec", "disagg-70b-h100", "--worker-id", "decode-0"))
    assert set(config.peers) == {f"http://{h}:{p}" for p in (8100, 8101)
                                 for h in ("127.0.0.1", f"prefill-{p - 8100}")}
    config, _ = cli.config_from_args(parse("--spec", "disagg-70b-h100", "--worker-id", "decode-0",
                                           "--peer", "http://p:1"))
    assert config.peers == ["http://p:1"]


def test_kubernetes_decode_workers_trust_the_prefill_pods_by_name():
    config, _ = cli.config_from_args(parse("--spec", "disagg-70b-h100", "--worker-id", "decode-0", "--port", "8100",
                                           "--peer-host", "{id}.kvlab-workers", "--peer-port", "8100"))
    assert config.peers == ["http://prefill-0.kvlab-workers:8100", "http://prefill-1.kvlab-workers:8100"]
