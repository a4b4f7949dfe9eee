"""The live dashboard in a real browser: headless Chromium against an embedded cluster under load.

Two workers and a router run in-process; a background loop streams a mix of long-prompt and
decode-heavy requests through two policies and two tenants (one rate-limited, so some requests are
refused). Chromium opens /dashboard; the values the page's script wrote into the DOM are read twice,
seconds apart: every panel must show non-zero values, and they must move. The page is saved as
test-artifacts/dashboard.png.
"""
from __future__ import annotations

import random
import re
import time

import pytest

from router.frontdoor.tenants import TenantConfig
from tests import ROOT
from tests.background_load import BackgroundLoad
from tests.headless_chromium import CHROMIUM, Browser
from tests.router_fixtures import MODEL, start_router  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed "
                                "(Debian: apt-get install chromium; .ci/run installs it when run as root)")

ARTIFACT = ROOT / "test-artifacts" / "dashboard.png"
TIME_SCALE = 4.0   # 4x slower than an H100: light on a 2-core host, still thousands of steps
PREFIXES = [[1000 + 97 * g + i for i in range(256)] for g in range(4)]   # shared "system prompts"

# Everything the page's script writes that the test checks: tiles, worker bars, chart points, tables.
READ_PAGE = """JSON.stringify({
  metrics: Object.fromEntries([...document.querySelectorAll('[data-metric]')]
      .map(e => [e.dataset.metric, e.textContent])),
  workers: [...document.querySelectorAll('[data-worker]')].map(w => Object.fromEntries(
      [...w.querySelectorAll('[data-bar]')].map(b => [b.dataset.bar, b.querySelector('.num').textContent]))),
  charts: Object.fromEntries([...document.querySelectorAll('svg[id^=chart-]')]
      .map(s => [s.id, +(s.dataset.points || 0)])),
  policies: document.querySelectorAll('#policies tbody tr').length,
  rejections: [...document.querySelectorAll('#rejections tbody td')].map(td => td.textContent),
  updates: window.kvlab.updates,
})"""
PANELS = ("prefill_util", "decode_util", "kv_usage", "hit_rate", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
          "routed_per_s")


def make_request(i: int) -> tuple[dict, dict]:
    """Alternate long prompts (prefill work) and short ones with long answers (decode work)."""
    rng = random.Random(i)
    prefix = PREFIXES[i % len(PREFIXES)]
    long_prompt = i % 2 == 0
    tail = [rng.randrange(2000, 100_000) for _ in range(768 if long_prompt else 16)]
    body = {"model": MODEL, "prompt": prefix + tail, "max_tokens": 2 if long_prompt else 40,
            "stream_options": {"include_usage": True}}   # usage carries cached tokens: hit rate per policy
    headers = {"authorization": "Bearer key-beta" if i % 5 == 0 else "Bearer key-alpha"}
    if i % 3 == 0:
        headers["x-kvlab-policy"] = "round_robin"   # a second policy, so hit rates compare per policy
    return body, headers


def number(text: str) -> float:
    match = re.search(r"-?\d+(\.\d+)?", text)
    return float(match.group()) if match else 0.0


def read(browser: Browser) -> dict:
    import json
    return json.loads(browser.evaluate(READ_PAGE))


def wait_for_panels(browser: Browser, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        page = read(browser)
        if all(number(page["metrics"][k]) > 0 for k in PANELS) and page["charts"]["chart-util"] >= 3:
            return page
        if time.monotonic() > deadline:
            pytest.fail(f"panels did not fill in {timeout_s} s: {page}")
        time.sleep(0.25)


@pytest.mark.slow
def test_dashboard_shows_live_cluster_values_that_move(start_worker, start_router, tmp_path):
    workers = [start_worker(worker_id=f"worker-{i}", time_scale=TIME_SCALE, num_blocks=1024) for i in range(2)]
    tenants = [TenantConfig(name="alpha", api_keys=["key-alpha"]),
               TenantConfig(name="beta", api_keys=["key-beta"], requests_per_s=0.5)]
    router = start_router(workers, tenants=tenants, policy_header=True)   # requests pick a second policy
    with BackgroundLoad(router.url, make_request, concurrency=6) as load, Browser(tmp_path / "chromium") as browser:
        browser.navigate(router.url + "/dashboard")
        first = wait_for_panels(browser)
        time.sleep(4.0)
        second = read(browser)
        browser.screenshot(ARTIFACT)
    assert load.statuses[200] > 0 and load.statuses[429] > 0, load.statuses

    for page in (first, second):
        assert all(number(page["metrics"][k]) > 0 for k in PANELS), page["metrics"]
        assert ":" in page["metrics"]["ratio"], page["metrics"]["ratio"]
        assert len(page["workers"]) == 2
    # Both workers got traffic (round robin alone sends each a third of it). Utilization is over a window;
    # KV usage is of the instant, and a worker may hold no request at one instant.
    for before, after in zip(first["workers"], second["workers"], strict=True):
        assert number(after["prefill"]) > 0 and number(after["decode"]) > 0, second["workers"]
        assert number(before["kv"]) > 0 or number(after["kv"]) > 0, (first["workers"], second["workers"])
    assert second["policies"] == 2 and second["charts"]["chart-hits"] > 0
    assert "rate_limited" in " ".join(second["rejections"]) or number(second["metrics"]["rejections_total"]) > 0

    assert second["updates"] > first["updates"]
    assert second["charts"]["chart-util"] > first["charts"]["chart-util"]
    moved = [k for k in PANELS if first["metrics"][k] != second["metrics"][k]]
    assert len(moved) >= 3, (first["metrics"], second["metrics"])
    assert ARTIFACT.stat().st_size > 20_000
