"""The sweep's report: one JSON document, a CSV row per rate, a Markdown table and a PNG plot.

Every number is in the server's time (emulated seconds, requests per emulated second), so measured,
simulated and planned columns compare directly.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import msgspec

CSV_FIELDS = [
    ("rate", "rate"), ("valid", "valid"), ("stationary", "stationary"), ("stationary_state", "stationary_state"),
    ("met_slo", "met_slo"), ("judged_by", "judged_by"),
    ("sent_rps", "sent_rps"), ("served_rps", "served_rps"), ("window_s", "window.window_s"),
    ("window_lifetimes", "window.lifetimes"), ("warmup_s", "window.warmup_s"), ("lifetime_s", "window.lifetime_s"),
    ("ttft_p99_with_failures_s", "ttft_p99_with_failures"),
    ("throughput_rps", "measured.throughput_rps"), ("goodput_rps", "measured.goodput_rps"),
    ("ttft_p50_s", "measured.ttft.p50"), ("ttft_p99_s", "measured.ttft.p99"),
    ("itl_p50_s", "measured.itl.p50"), ("itl_p99_s", "measured.itl.p99"),
    ("e2e_p99_s", "measured.e2e.p99"), ("requests", "measured.requests"), ("rejected", "measured.rejected"),
    ("prefix_hit_rate", "measured.prefix_hit_rate"), ("lag_p99_s", "lag_p99_s"),
    ("client_lag_p99_s", "client_lag_p99_s"),
    ("sim_throughput_rps", "simulated.throughput_rps"), ("sim_ttft_p99_s", "simulated.ttft.p99"),
    ("sim_itl_p99_s", "simulated.itl.p99"), ("sim_goodput_rps", "simulated.goodput_rps"),
    ("sim_prefix_hit_rate", "simulated.prefix_hit_rate"),
    ("steady_ttft_p99_s", "steady.ttft.p99"), ("steady_itl_p99_s", "steady.itl.p99"),
    ("steady_throughput_rps", "steady.throughput_rps"),
    ("plan_ttft_p99_s", "planned.ttft_p99"), ("plan_itl_p99_s", "planned.itl_p99"),
    ("plan_goodput_rps", "planned.goodput"),
]


def get(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def to_builtins(obj: Any) -> Any:
    """Structs, dataclasses and NaN-bearing floats as JSON-safe builtins (NaN and inf become null)."""
    return _clean(msgspec.to_builtins(obj))


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_all(report: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "sweep.json", "csv": out / "sweep.csv", "markdown": out / "sweep.md",
             "plot": out / "sweep.png"}
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    write_csv(report, files["csv"])
    files["markdown"].write_text(markdown(report))
    try:
        plot(report, files["plot"])
    except Exception as exc:  # a plot is a convenience: never lose the numbers over it
        report["warnings"].append(f"plot not written: {exc}")
        files.pop("plot")
    return {k: str(v) for k, v in files.items()}


def write_csv(report: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _ in CSV_FIELDS])
        for point in report["points"]:
            writer.writerow(["" if (v := get(point, key)) is None else v for _, key in CSV_FIELDS])


# -- tables -----------------------------------------------------------------------------------------

COLUMNS = [  # header, key, format ("ms": seconds shown as ms; "yn": yes/no)
    ("offered/s", "rate", "{:.1f}"), ("sent/s", "sent_rps", "{:.1f}"), ("served/s", "served_rps", "{:.1f}"),
    ("window s", "window.window_s", "{:.1f}"), ("lifetimes", "window.lifetimes", "{:.1f}"),
    ("warm-up L", "window.warmup_lifetimes", "{:.1f}"),
    ("stationary", "stationary_state", "{}"), ("lag wall ms", "lag_p99_s", "ms"),
    ("TTFT p50", "measured.ttft.p50", "ms"), ("TTFT p99", "ttft_p99_with_failures", "ms"),
    ("ITL p99", "measured.itl.p99", "ms"), ("SLO met", "met_slo", "yn"),
    ("steady TTFT99", "steady.ttft.p99", "ms"), ("plan TTFT99", "planned.ttft_p99", "ms"),
]


def cell(value: Any, fmt: str) -> str:
    if fmt == "yn":
        return "-" if value is None else ("yes" if value else "NO")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "ms":
        return f"{value * 1000:.0f}" if value * 1000 >= 10 else f"{value * 1000:.1f}"
    return fmt.format(value)


def row_cells(point: dict) -> list[str]:
    cells = [cell(get(point, key), fmt) for _, key, fmt in COLUMNS]
    why = {"later half": "NO (2nd half)", "queue growing": "NO (filling)"}.get(str(point.get("judged_by")))
    if why:
        cells[[key for _, key, _ in COLUMNS].index("met_slo")] = why
    if not point.get("valid", True):
        cells[0] += "!"
    return cells


def table(report: dict) -> str:
    """The measured-vs-simulated-vs-planned table as aligned text (latencies in emulated ms)."""
    header = [h for h, _, _ in COLUMNS]
    rows = [row_cells(p) for p in report["points"]]
    # A floor of 7 keeps rows printed one at a time (as stages finish) aligned with the header.
    widths = [max(len(h), 7, *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def row_cells_text(point: dict) -> str:
    """One point as a table line, aligned with table()'s header (printed as each stage finishes)."""
    return table({"points": [point]}).splitlines()[-1]


def capacity_lines(report: dict) -> list[str]:
    c, slo = report["c_max"], report["slo"]
    lines = [f"SLO: p99 TTFT <= {slo['ttft_p99_s'] * 1000:.0f} ms, p99 ITL <= {slo['itl_p99_s'] * 1000:.0f} ms "
             f"(emulated; time scale {report['time_scale']:g})"]
    labels = {"measured": "measured (Locust, live)", "steady": "simulated, steady state",
              "planned": "planned (analytical)"}
    for name, label in labels.items():
        entry = c.get(name) or {}
        if entry.get("rate") is not None:
            limited = f", limited by p99 {entry['limited_by'].upper()}" if entry.get("limited_by") else ""
            lines.append(f"C_max {label:25s} {entry['text']} req/s{limited}")
        elif entry.get("error"):
            lines.append(f"C_max {label:25s} n/a ({entry['error']})")
    gaps = c.get("gap_pct") or {}
    text = {"steady": "measured vs simulated steady state", "planned": "measured vs planned",
            "steady vs planned": "simulated steady state vs planned"}
    parts = [f"{text[k]} {v:+.1f}%" for k, v in gaps.items() if v is not None and k in text]
    if parts:
        lines.append("gaps: " + "; ".join(parts))
    return lines


def markdown(report: dict) -> str:
    header = [h for h, _, _ in COLUMNS]
    st = report.get("stages", {})
    out = [f"# kvlab sweep: {report['spec']}", "",
           f"Target {report['target']}; workload {report['workload']}; time scale {report['time_scale']:g}; "
           f"{'VALID' if report['valid'] else '**INVALID: some rates lagged or were not stationary**'}", "",
           "Latencies in emulated milliseconds, rates in requests per emulated second; `!` marks a rate that "
           "lagged or whose window was not stationary. Each rate ran alone from an idle cluster: a warm-up of at "
           f"least {st.get('warmup_lifetimes', 3):g} request lifetimes (the steady-state simulator's mean "
           "end-to-end latency at that rate), longer where the simulated cluster took longer to fill from empty "
           "to its steady number of requests (the warm-up column), and a window of "
           f"{st.get('window_lifetimes', 10):g} lifetimes. sent/s: arrivals in "
           "the window (Poisson around the offered rate); served/s: requests finished in it. Stationary: the "
           "window's halves agree on p99 TTFT (within 35%, within the p99's own sampling band, or both at most "
           "80% of the SLO) and requests "
           "in the system, and below C_max served is within 3% "
           "of sent (or the 3-sigma noise of requests in flight at the window's edges, when larger). "
           "Overloaded: past C_max the halves drift only towards worse (the queue grows until the shedder "
           "caps it, many lifetimes just past C_max), so the rate's miss holds; halves that improve there are NO. "
           "A rate that met the SLO over its window while drifting towards worse is judged by where it was "
           "heading (from an idle cluster the queue only fills): a miss when its later half missed (`NO (2nd "
           "half)`), or when it served less than it was sent while its TTFT or queue still grew after the warm-up "
           "(`NO (filling)`: held, the queue reaches the shedder's cap). "
           "TTFT p99 counts refused requests as misses.", "",
           "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    out += ["| " + " | ".join(row_cells(p)) + " |" for p in report["points"]]
    out += [""] + [f"- {line}" for line in capacity_lines(report)]
    if report["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(out) + "\n"


# -- plot -------------------------------------------------------------------------------------------

SERIES = [  # source, label, style, color
    ("measured", "measured (Locust)", "o-", "C0"), ("simulated", "simulated, same schedule", "s--", "C1"),
    ("steady", "simulated, steady state", "d:", "C3"), ("planned", "planned", "^:", "C2")]


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    points, slo = report["points"], report["slo"]
    rates = [p["rate"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("p99 TTFT (ms, emulated)", "ttft", slo["ttft_p99_s"]),
              ("p99 ITL (ms, emulated)", "itl", slo["itl_p99_s"])]
    for ax, (title, metric, limit) in zip(axes[:2], panels, strict=True):   # axes[2]: throughput, below
        for source, label, style, color in SERIES:
            key = f"planned.{metric}_p99" if source == "planned" else f"{source}.{metric}.p99"
            _series(ax, rates, points, key, label, style, color, 1000)
        ax.axhline(limit * 1000, color="red", lw=1, label="SLO")
        ax.set_yscale("log")
        ax.set_title(title)
    ax = axes[2]
    _series(ax, rates, points, "served_rps", "measured: served", "o-", "C0", 1)
    _series(ax, rates, points, "measured.goodput_rps", "measured goodput", "o--", "C0", 1)
    _series(ax, rates, points, "steady.goodput_rps", "simulated goodput (steady)", "d:", "C3", 1)
    _series(ax, rates, points, "planned.goodput", "planned goodput", "^:", "C2", 1)
    ax.plot(rates, rates, color="gray", lw=0.8, label="offered")
    ax.set_title("requests/s served (emulated)")
    for ax in axes:
        _cmax_markers(ax, report)
        ax.set_xlabel("offered rate (req/s, emulated)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"kvlab sweep: {report['spec']} (time scale {report['time_scale']:g}); dash-dot lines: C_max"
                 + ("" if report["valid"] else "  [INVALID: lag]"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(ax, rates, points, key, label, style, color, scale) -> None:
    ys = [get(p, key) for p in points]
    xs = [r for r, y in zip(rates, ys, strict=True) if y is not None]
    ys = [y * scale for y in ys if y is not None]
    if xs:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], style, label=label, ms=4, color=color)


def _cmax_markers(ax, report) -> None:
    for source, _, _, color in SERIES:
        entry = report["c_max"].get(source)
        rate = entry.get("rate") if isinstance(entry, dict) else None
        if rate is not None:
            ax.axvline(rate, color=color, lw=0.8, ls="-.", alpha=0.7)
