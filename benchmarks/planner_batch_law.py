"""The planner's batch law of a prefill worker (emulator.planner.batch_queue) against the queue it models,
replayed event by event (loadtests.batch_replay): busy share, TTFT mean and quantiles, side by side.

    .venv/bin/python benchmarks/planner_batch_law.py [--requests 200000] [--seed 7]

Cases: linear steps (24 ms + 0.118 ms a token on an 8,192-token budget, prompts of 150-3,000 tokens;
22 ms + 0.1 ms a token on a 4,096-token budget, short prompts with long ones behind them, prompts
shorter than a cell), and the prefill workers of two drawn clusters with the planner's own step times
and prompt points: draw #6 of `benchmarks/planner_vs_sim.py --seed 13` (70B, H100 TP4, chat + RAG) and
draw #4 of `--seed 12` (70B, A100 TP8, agentic). Deterministic: the law is exact arithmetic, the replay
seeded; the ratio column is law / replay.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.planner import batch_queue, context, dist, operating, prefill, prefill_queue  # noqa: E402
from loadtests import planner_bridge, planner_draws  # noqa: E402
from loadtests.batch_replay import linear_server, replay  # noqa: E402

QUANTILES = (0.5, 0.9, 0.99)


def linear_case(sizes, weights, rate, a, b, budget):
    """(server, own latencies, step function, sizes, weights, budget) of a worker whose step is a + b x tokens."""
    return (*linear_server(sizes, weights, rate, a, b, budget), np.asarray(sizes, float), weights, budget)


def drawn_case(draw, rate):
    """The same for a drawn cluster's prefill worker: the planner's step times and prompt points."""
    spec = draw.spec()
    req, work, cluster, _ = planner_bridge.planner_inputs(spec)
    ctx = operating.at_rate(context.build(req, work, spec.catalog_data()), cluster, rate)
    prof = prefill.profile(ctx, 0)
    q = prefill_queue.queue(ctx, prof, rate, cluster.prefill)
    if q.batches is None:
        raise SystemExit(f"draw {draw.index}: its prefill worker is not solved by the batch law at {rate} req/s")

    def step(tokens: float) -> float:
        return prefill.packed_step(ctx, 0, max(1, int(tokens))).seconds

    return q.batches, q.own, step, np.asarray(ctx.new_tokens, float), ctx.prompts.weights, prof.budget


def cases():
    six = next(d for d in planner_draws.draws(13, 10) if d.index == 6)
    four = next(d for d in planner_draws.draws(12, 30) if d.index == 4)
    long_tail = ((150, 300, 600, 1200, 3000), (0.3, 0.3, 0.2, 0.15, 0.05))
    yield "linear, 150-3,000 tokens", 9.5, lambda: linear_case(*long_tail, 9.5, 0.024, 1.18e-4, 8192)
    for rate in (15.0, 25.0):
        yield "linear, 36 / 500 tokens", rate, lambda r=rate: linear_case((36, 500), (0.8, 0.2), r, 0.022, 1e-4, 4096)
    yield "linear, 30 / 45 tokens", 30.0, lambda: linear_case((30, 45), (0.5, 0.5), 30.0, 0.022, 1e-4, 4096)
    for rate in (10.0, 17.0, 21.0):
        yield "seed-13 draw #6", rate, lambda r=rate: drawn_case(six, r)
    yield "seed-12 draw #4", 9.5, lambda: drawn_case(four, 9.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000, help="arrivals replayed per case")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{'case':28} {'req/s':>6} {'busy':>6}  {'mean ms law / replay':>22}  "
          + "  ".join(f"{'p' + format(q * 100, 'g') + ' law / replay':>24}" for q in QUANTILES))
    for name, rate, build in cases():
        server, own, step, sizes, weights, budget = build()
        values, w, busy = batch_queue.ttft(server, own)
        law = dist.Points(values, w)
        ref = replay(rate, sizes, weights, budget, step, args.requests, args.seed)
        cells = [_pair(law.mean(), ref.mean())] + [_pair(law.quantile(q), float(np.quantile(ref, q)))
                                                   for q in QUANTILES]
        print(f"{name:28} {rate:6.1f} {busy:6.3f}  " + "  ".join(cells))


def _pair(law: float, ref: float) -> str:
    return f"{law * 1000:7.1f} / {ref * 1000:7.1f} ({law / ref:5.3f})".rjust(24)


if __name__ == "__main__":
    main()
