"""Engine steps per CPU-second for a batch of 256 running decode requests (pure engine, no HTTP).

Real-time emulation needs the CPU cost of a step below the emulated step duration, i.e.
steps per CPU-second >= 1 / step duration; the headroom is their ratio. Prompts are distinct
(no prefix sharing) and long enough that every step is a pure decode step once prefill is done.

    .venv/bin/python benchmarks/engine_step.py [--batch 256] [--prompt 512] [--steps 2000] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from emulator.engine_config import EngineConfig
from emulator.physics import roofline
from emulator.physics.catalog import builtin_catalog
from workers.core.engine import Engine
from workers.core.request import SamplingParams


def running_engine(batch: int, prompt: int, steps: int, model: str, gpu: str) -> Engine:
    """An engine whose `batch` requests have all finished prefill and are decoding."""
    cat = builtin_catalog()
    dep = roofline.Deployment(model=cat.model(model), gpu=cat.gpu(gpu))
    # Early finishers of prefill decode while the rest prefill: leave slack so nobody finishes.
    max_tokens = steps + 64
    blocks = batch * -(-(prompt + max_tokens) // 16)   # room for every request's whole decode
    engine = Engine(dep, EngineConfig(num_blocks=blocks, max_num_seqs=batch))
    params = SamplingParams(max_tokens=max_tokens)
    for i in range(batch):
        engine.add_request(f"r{i}", [1024 + i * prompt + j for j in range(prompt)], params, 0.0)
    now = 0.0
    while any(r.is_prefilling or not r.output_tokens for r in engine.requests.values()):
        now = engine.step(now).end
    return engine


def measure(engine: Engine, steps: int) -> tuple[float, float]:
    """CPU seconds per step and the mean emulated step duration."""
    now, emulated = 0.0, 0.0
    cpu0 = time.process_time()
    for _ in range(steps):
        result = engine.step(now)
        assert result.decode_tokens == len(engine.scheduler.running)
        emulated += result.duration
        now = result.end
    return (time.process_time() - cpu0) / steps, emulated / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--model", default="Llama-3.1-8B")
    parser.add_argument("--gpu", default="H100-SXM")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured steps")
    args = parser.parse_args()
    engine = running_engine(args.batch, args.prompt, args.steps, args.model, args.gpu)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
    cpu_per_step, step_s = measure(engine, args.steps)
    if args.profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    print(f"batch {args.batch} decoding, {args.model} on {args.gpu}, {args.steps} steps")
    print(f"engine: {1 / cpu_per_step:,.0f} steps per CPU-second ({cpu_per_step * 1e3:.3f} ms CPU per step)")
    print(f"emulated step duration: {step_s * 1e3:.3f} ms -> real time needs >= {1 / step_s:,.0f} steps/s")
    print(f"headroom: {step_s / cpu_per_step:.1f}x real time")


if __name__ == "__main__":
    main()
