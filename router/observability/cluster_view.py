"""The cluster as the router sees it: utilization, KV pressure, hit rates, latency, routing, rejections.

Pure aggregation, no I/O: router.observability.dashboard feeds it and serves what it computes. Inputs:
- each worker's ``GET /load`` snapshot, as the pool's health probe polls it, with the poll time;
- the router's own counters (decisions, overflow, prompt and cached tokens, rejections), sampled;
- TTFT and ITL of the streams the router relays, already in emulated seconds (router.forwarding.stream_timing).

Utilization is emulated GPU busy time over emulated elapsed time: on one worker
Δbusy_prefill_s / Δemulated_now_s over the window, and for a pool or the cluster the sums of both over
its workers. Busy and elapsed are both emulated, so the figure does not depend on the time scale; the
wall clock only decides which snapshots fall in the window. A step's busy time is credited when the
step ends, so a window can hold a step more than it covered: that edge is why figures clamp at 1.

Busy time says how often the GPU works, not how hard: at low load a worker decodes a batch of three
sequences back to back and is "busy" nearly all the time. Three figures show the headroom:
- decode batch occupancy: sequences per decode step over the engine's max_num_seqs;
- MBU: HBM bytes moved over what the datasheet bandwidth could move in the window;
- MFU: FLOPs done over what the datasheet peak could do in the window (both as vLLM and SGLang define them).
The prefix hit rate has one definition everywhere: prompt tokens served from the prefix cache over prompt
tokens, over the window (``HIT_RATE_DEFINITION``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import msgspec

from router.observability.sliding import SampleWindow, SnapshotWindow, percentiles

# Wall seconds a worker's steps may run late (p99) before its emulated timings are flagged as suspect;
# the same default as the cluster spec's lag_warn_s.
LAG_WARN_S = 0.05
HIT_RATE_DEFINITION = ("prompt tokens served from the prefix cache / prompt tokens, over the last window "
                       "(workers' counters; per policy: the cached tokens the workers report back)")

Counters = dict[str, dict[tuple[str, ...], float]]   # family -> label values -> cumulative count


class LoadSnapshot(msgspec.Struct):
    """The fields of a worker's ``GET /load`` the view reads; others are ignored."""
    role: str = "both"
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    busy_prefill_s: float = 0.0
    busy_decode_s: float = 0.0
    lag_p99_s: float = 0.0
    time_scale: float = 1.0
    emulated_now_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    max_num_seqs: int = 0
    hbm_bytes: float = 0.0                 # per GPU, cumulative
    flops: float = 0.0
    peak_hbm_bytes_per_s: float = 0.0      # per GPU, datasheet
    peak_flops: float = 0.0


_load_decoder = msgspec.json.Decoder(LoadSnapshot)


def decode_load(body: bytes) -> LoadSnapshot:
    """Raises msgspec.MsgspecError on a body that is not a /load answer."""
    return _load_decoder.decode(body)


class Member(msgspec.Struct):
    """A worker in the router's pool now; the pool, not old snapshots, decides who is shown."""
    id: str
    role: str = "both"
    up: bool = True
    in_flight: int = 0


@dataclass
class Busy:
    """What changed on one or more workers over a window (emulated seconds, token counts)."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    elapsed_s: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    preemptions: float = 0.0
    decode_steps: float = 0.0
    decode_tokens: float = 0.0
    slot_steps: float = 0.0        # decode steps x max_num_seqs: the sequences they could have carried
    hbm_bytes: float = 0.0
    hbm_peak_bytes: float = 0.0    # datasheet bandwidth x elapsed
    flops: float = 0.0
    peak_flops: float = 0.0        # datasheet FLOP/s x elapsed

    @classmethod
    def between(cls, old: LoadSnapshot, new: LoadSnapshot) -> Busy:
        elapsed, steps = new.emulated_now_s - old.emulated_now_s, new.decode_steps - old.decode_steps
        return cls(new.busy_prefill_s - old.busy_prefill_s, new.busy_decode_s - old.busy_decode_s,
                   elapsed, new.prefix_cache_hits - old.prefix_cache_hits,
                   new.prefix_cache_queries - old.prefix_cache_queries, new.preemptions - old.preemptions,
                   steps, new.decode_tokens - old.decode_tokens, steps * new.max_num_seqs,
                   new.hbm_bytes - old.hbm_bytes, new.peak_hbm_bytes_per_s * elapsed,
                   new.flops - old.flops, new.peak_flops * elapsed)

    def __add__(self, other: Busy) -> Busy:
        return Busy(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def figures(self) -> dict:
        elapsed, busy = self.elapsed_s, self.prefill_s + self.decode_s
        return {
            "prefill_util": min(1.0, self.prefill_s / elapsed) if elapsed > 0 else None,
            "decode_util": min(1.0, self.decode_s / elapsed) if elapsed > 0 else None,
            "ratio": self.prefill_s / self.decode_s if self.decode_s > 0 else None,
            "prefill_share": self.prefill_s / busy if busy > 0 else None,
            "hit_rate": self.hits / self.queries if self.queries > 0 else None,
            "decode_batch": self.decode_tokens / self.decode_steps if self.decode_steps > 0 else None,
            "decode_occupancy": _share(self.decode_tokens, self.slot_steps),
            "mbu": _share(self.hbm_bytes, self.hbm_peak_bytes),
            "mfu": _share(self.flops, self.peak_flops),
        }


class ClusterView:
    def __init__(self, window_s: float = 5.0, latency_window_s: float = 15.0, retain_s: float = 60.0,
                 history_len: int = 300, max_samples: int = 20_000):
        self.window_s = window_s
        self.latency_window_s = latency_window_s
        self.retain_s = max(retain_s, window_s, latency_window_s)
        self._loads: dict[str, SnapshotWindow[LoadSnapshot]] = {}
        self._counters: SnapshotWindow[Counters] = SnapshotWindow(self.retain_s)
        self._ttft = SampleWindow(max_samples)
        self._itl = SampleWindow(max_samples)
        self.history: deque[dict] = deque(maxlen=history_len)

    # -- inputs ----------------------------------------------------------------------------------
    def observe_load(self, worker_id: str, t: float, snap: LoadSnapshot) -> None:
        series = self._loads.setdefault(worker_id, SnapshotWindow(self.retain_s))
        last = series.latest()
        if last is not None and snap.emulated_now_s < last[1].emulated_now_s:
            series.clear()   # the worker restarted: its counters began again
        series.add(t, snap)

    def observe_counters(self, t: float, counters: Counters) -> None:
        self._counters.add(t, counters)

    def observe_ttft(self, t: float, seconds: float) -> None:
        self._ttft.add(t, seconds)

    def observe_itl(self, t: float, seconds: float, n: int = 1) -> None:
        self._itl.add(t, seconds, n)

    def time_scale(self, worker_id: str) -> float:
        """Wall seconds per emulated second on this worker (1 when it reports none)."""
        series = self._loads.get(worker_id)
        last = series.latest() if series else None
        return last[1].time_scale if last and last[1].time_scale > 0 else 1.0

    def forget(self, keep: set[str]) -> None:
        """Drop the series of workers that left the pool."""
        for worker_id in set(self._loads) - keep:
            del self._loads[worker_id]

    # -- outputs ---------------------------------------------------------------------------------
    def view(self, now: float, members: list[Member], window_s: float | None = None) -> dict:
        window = window_s or self.window_s
        busy = {m.id: self._busy(m.id, now, window) for m in members}
        latest = {m.id: self._latest(m.id) for m in members}
        routing = self._routing(now, window)
        return {
            "window_s": window,
            "hit_rate_definition": HIT_RATE_DEFINITION,
            "cluster": _aggregate(members, busy, latest),
            "pools": {role: _aggregate([m for m in members if m.role == role], busy, latest)
                      for role in sorted({m.role for m in members})},
            "workers": [_worker_row(m, busy[m.id], latest[m.id], routing["per_worker"]) for m in members],
            "latency": self._latency(now),
            "routing": routing["policies"],
            "rejections": routing["rejections"],
        }

    def record(self, t: float, now: float, members: list[Member]) -> dict:
        """Append one history point (labelled `t`) computed at `now`; returns it."""
        v = self.view(now, members)
        c, lat = v["cluster"], v["latency"]
        point = {"t": round(t, 3), **{k: c[k] for k in ("prefill_util", "decode_util", "ratio", "prefill_share",
                                                         "kv_usage", "hit_rate", "decode_occupancy", "mbu",
                                                         "mfu")},
                 "ttft_p50": lat["ttft"]["p50"], "ttft_p99": lat["ttft"]["p99"],
                 "itl_p50": lat["itl"]["p50"], "itl_p99": lat["itl"]["p99"],
                 "routed_per_s": sum(p["routed_per_s"] for p in v["routing"].values()),
                 "rejected_per_s": v["rejections"]["per_s"],
                 "policy_hit_rate": {name: p["hit_rate"] for name, p in v["routing"].items()}}
        self.history.append(point)
        return point

    def history_since(self, t: float | None) -> list[dict]:
        return [p for p in self.history if t is None or p["t"] > t]

    # -- pieces ----------------------------------------------------------------------------------
    def _latest(self, worker_id: str) -> LoadSnapshot | None:
        series = self._loads.get(worker_id)
        last = series.latest() if series else None
        return last[1] if last else None

    def _busy(self, worker_id: str, now: float, window: float) -> Busy | None:
        series = self._loads.get(worker_id)
        span = series.span(now, window) if series else None
        return Busy.between(span[0][1], span[1][1]) if span else None

    def _latency(self, now: float) -> dict:
        out: dict[str, object] = {}
        for name, samples in (("ttft", self._ttft), ("itl", self._itl)):
            values = samples.values(now, self.latency_window_s)
            p50, p99 = percentiles(values, (0.5, 0.99))
            out[name] = {"p50": p50, "p99": p99, "n": len(values)}
        out["window_s"] = self.latency_window_s
        return out

    def _routing(self, now: float, window: float) -> dict:
        latest = self._counters.latest()
        totals = latest[1] if latest else {}
        span = self._counters.span(now, window)
        if span:
            (t0, old), (t1, new) = span
            delta, dt = _delta(old, new), t1 - t0
        else:
            delta, dt = {}, 0.0
        return {"per_worker": _per_worker(delta, dt), "policies": _policies(totals, delta, dt),
                "rejections": _rejections(totals, delta, dt)}


# -- aggregation helpers (plain functions of plain data) ------------------------------------------
def _aggregate(members: list[Member], busy: dict[str, Busy | None], latest: dict) -> dict:
    windows = [b for b in (busy[m.id] for m in members) if b is not None]
    total = sum(windows, Busy())
    snaps = [latest[m.id] for m in members if m.up and latest[m.id] is not None]
    usage = [s.kv_usage for s in snaps]
    lag = max((s.lag_p99_s for s in snaps), default=0.0)
    return {**total.figures(), "workers": len(members), "workers_up": sum(m.up for m in members),
            "kv_usage": sum(usage) / len(usage) if usage else None, "kv_usage_max": max(usage, default=None),
            "running": sum(s.running for s in snaps), "waiting": sum(s.waiting for s in snaps),
            "in_flight": sum(m.in_flight for m in members), "lag_p99_s": lag, "lagging": lag > LAG_WARN_S,
            "time_scale": snaps[0].time_scale if snaps else None}


def _worker_row(m: Member, busy: Busy | None, snap: LoadSnapshot | None, routed: dict[str, float]) -> dict:
    figures = busy.figures() if busy else Busy().figures()
    row = {"id": m.id, "role": m.role, "up": m.up, "in_flight": m.in_flight, **figures,
           "routed_per_s": routed.get(m.id, 0.0), "preemptions_in_window": busy.preemptions if busy else 0}
    if snap is not None:
        row.update(running=snap.running, waiting=snap.waiting, kv_usage=snap.kv_usage, lag_p99_s=snap.lag_p99_s,
                   lagging=snap.lag_p99_s > LAG_WARN_S, time_scale=snap.time_scale, preemptions=snap.preemptions)
    return row


def _delta(old: Counters, new: Counters) -> Counters:
    return {family: {key: value - old.get(family, {}).get(key, 0.0) for key, value in series.items()}
            for family, series in new.items()}


def _share(part: float, whole: float) -> float | None:
    """part / whole clamped to [0, 1] (a step credited at its end can overfill a window), None on 0."""
    return min(1.0, max(0.0, part / whole)) if whole > 0 else None


def _rate(value: float, dt: float) -> float:
    return value / dt if dt > 0 else 0.0


def _per_worker(delta: Counters, dt: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for (_policy, worker), value in delta.get("decisions", {}).items():
        out[worker] = out.get(worker, 0.0) + _rate(value, dt)
    return out


def _policies(totals: Counters, delta: Counters, dt: float) -> dict[str, dict]:
    names = {key[0] for key in totals.get("decisions", {})}
    out = {}
    for name in sorted(names):
        def d(family: str, name: str = name) -> float:   # called within this iteration; bound for clarity
            return sum(v for k, v in delta.get(family, {}).items() if k[0] == name)
        prompt = d("prompt_tokens")
        out[name] = {
            "routed_per_s": _rate(d("decisions"), dt),
            "overflow_per_s": _rate(d("overflow"), dt),
            "hit_rate": d("cached_tokens") / prompt if prompt > 0 else None,
            "estimated_hit_rate": d("estimated_hit_tokens") / prompt if prompt > 0 else None,
            "decisions_total": sum(v for k, v in totals["decisions"].items() if k[0] == name),
            "overflow_total": totals.get("overflow", {}).get((name,), 0.0),
        }
    return out


def _rejections(totals: Counters, delta: Counters, dt: float) -> dict:
    window = delta.get("rejections", {})
    counts = sorted(totals.get("rejections", {}).items(), key=lambda kv: (-kv[1], kv[0][1]))   # most, then reason
    by = [{"status": k[0], "reason": k[1], "tenant": k[2], "count": v, "per_s": _rate(window.get(k, 0.0), dt)}
          for k, v in counts]
    tenants: dict[str, float] = {}
    for (_status, _reason, tenant), count in counts:
        tenants[tenant] = tenants.get(tenant, 0.0) + count
    return {"total": sum(v for _, v in counts), "per_s": _rate(sum(window.values()), dt), "by": by,
            "by_tenant": tenants}
