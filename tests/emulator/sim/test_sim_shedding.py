"""The simulator sheds load as the router's front door does: the same DrainLimit, configured from the
same spec, on the emulated clock."""
import msgspec
import pytest

from emulator import workload
from emulator.sim.simulator import Simulator
from emulator.spec import example_spec_path, load_spec
from loadtests import parallel_runs
from router.config import from_spec, shedding_config

TINY = load_spec(example_spec_path("tiny-test"))
NO_SHEDDING = msgspec.structs.replace(TINY, router=msgspec.structs.replace(TINY.router, shedding=False))


def _overloaded(spec, rate=40.0, n=1500):
    sim = Simulator(spec).run(workload.from_spec(spec, rate, num_requests=n))
    return sim, sim.summary()


def test_the_simulators_shedder_is_the_routers_in_emulated_seconds():
    spec = msgspec.structs.replace(TINY, engine=msgspec.structs.replace(TINY.engine, time_scale=3.0))
    router = from_spec(str(example_spec_path("tiny-test")))[0].shedding
    emulated = shedding_config(spec, time_scale=1.0)
    wall = shedding_config(spec)
    assert router.enabled and emulated.enabled and emulated.places == router.places == wall.places
    assert wall.ttft_slo_s == pytest.approx(3.0 * emulated.ttft_slo_s)
    assert wall.drain_s == pytest.approx(3.0 * emulated.drain_s)
    assert emulated.ttft_slo_s == TINY.slo.ttft_p99_s


def _refused(spec):
    """(requests refused as overloaded, summary) of an overloaded run; module-level, for a child process."""
    sim, summary = _overloaded(spec)
    return sum(1 for r in sim.log.records.values() if r.error == "overloaded"), summary


def test_past_capacity_the_simulator_refuses_rather_than_queues():
    # the two runs side by side on the host's cores (each is deterministic in its spec)
    (refused, with_shedding), (_, without) = parallel_runs.run_all(_refused, [(TINY,), (NO_SHEDDING,)])
    assert refused and with_shedding.rejected == refused and without.rejected == 0
    # Admitted requests keep their first token near the SLO; without the shedder the queue grows.
    assert with_shedding.ttft.p99 < 1.5 * TINY.slo.ttft_p99_s < without.ttft.p99
    assert with_shedding.ttft.p99 < without.ttft.p99 / 3


def test_below_capacity_nothing_is_shed():
    _, summary = _overloaded(TINY, rate=4.0, n=300)
    assert summary.rejected == 0 and summary.completed == 300
