"""One engine configuration: the live worker, the simulator and the planner take the same EngineConfig,
built from a spec in one place, and the spec's [engine] table defaults to it."""
import dataclasses

import pytest

from emulator.engine_config import DEFAULTS, EngineConfig
from emulator.planner import from_spec as planner_spec
from emulator.sim.simulator import Simulator
from emulator.spec import EngineSpec, example_specs, load_spec, parse_spec
from kvlab import cli
from workers.cli import config_from_args
from workers.config import build_engine


@pytest.mark.parametrize("name", example_specs())
def test_live_worker_simulator_and_planner_take_one_engine_config(name):
    spec = load_spec(name)
    sim = Simulator(spec)
    for slot in spec.worker_list():
        args = cli.build_parser().parse_args(["worker", "--spec", name, "--worker-id", slot.id])
        live = build_engine(config_from_args(args)[0])
        simulated = sim.workers[slot.id].engine
        assert live.config == simulated.config == spec.engine_config(slot.pool)
        assert live.config.role == slot.role
        assert live.dep == simulated.dep == spec.deployment(slot.pool)
        assert (live.kv_link, live.swap_link) == (simulated.kv_link, simulated.swap_link)
    planned = planner_spec.plan_request(spec).engine
    assert planned == dataclasses.replace(spec.engine_config(), role="both")


def test_spec_engine_table_defaults_to_the_engine_config_defaults():
    spec_defaults = EngineSpec()
    for field in dataclasses.fields(EngineConfig):
        if hasattr(spec_defaults, field.name):
            assert getattr(spec_defaults, field.name) == getattr(DEFAULTS, field.name), field.name


def test_every_engine_setting_of_the_spec_reaches_the_engine_config():
    spec = parse_spec("""
model = "Llama-3.1-8B"
gpu = "H100-SXM"
[engine]
block_size = 32
max_num_batched_tokens = 2048
max_num_seqs = 64
gpu_memory_utilization = 0.8
activation_reserve_gb = 3.0
max_model_len = 4096
max_waiting = 7
preemption = "swap"
swap_space_gb = 8.0
eviction = "lfu"
enable_prefix_caching = false
[[pools]]
role = "both"
""")
    config = spec.engine_config("both")
    assert config == EngineConfig(role="both", block_size=32, max_num_batched_tokens=2048, max_num_seqs=64,
                                  gpu_memory_utilization=0.8, activation_reserve_gb=3.0, max_model_len=4096,
                                  max_waiting=7, preemption="swap", swap_space_gb=8.0, eviction="lfu",
                                  enable_prefix_caching=False)
    assert Simulator(spec).workers["both-0"].engine.swap_link is not None   # swap preemption crosses host memory


def test_worker_flags_override_the_spec_engine_settings():
    args = cli.build_parser().parse_args(["worker", "--spec", "tiny-test", "--worker-id", "both-0",
                                          "--max-num-seqs", "3", "--role", "prefill"])
    config = config_from_args(args)[0]
    assert (config.engine.max_num_seqs, config.engine.role, config.role) == (3, "prefill", "prefill")
    assert config.engine.max_num_batched_tokens == load_spec("tiny-test").engine.max_num_batched_tokens


def test_planner_flags_override_the_spec_engine_settings():
    from emulator.planner import cli as planner_cli

    args = cli.build_parser().parse_args(["plan", "--spec", "tiny-test", "--max-num-seqs", "3"])
    req = planner_cli._inputs(args)[0]
    assert req.engine == dataclasses.replace(load_spec("tiny-test").engine_config(), max_num_seqs=3)
