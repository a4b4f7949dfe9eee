"""The cluster spec: every shipped example loads, and every bad field fails with one message naming it."""
from __future__ import annotations

import pytest

from emulator.physics import roofline
from emulator.spec import SpecError, example_specs, load_spec, parse_spec

BASE = 'model = "Llama-3.1-8B"\ngpu = "H100-SXM"\n'
ONE_POOL = "[[pools]]\ncount = 1\n"
PD_ROUTER = '[router]\npolicy = "pd_pair"\n'


def test_the_four_example_specs_ship():
    assert {"default", "colocated-8b-h100", "disagg-70b-h100", "tiny-test"} <= set(example_specs())


@pytest.mark.parametrize("name", example_specs())
def test_every_example_spec_loads_and_lists_its_workers(name):
    spec = load_spec(name)
    workers = spec.worker_list()
    assert len(workers) == sum(p.count for p in spec.pools)
    assert len({w.id for w in workers}) == len(workers)
    assert len({w.port for w in workers} | {spec.router.port}) == len(workers) + 1
    for pool in spec.pools:
        assert spec.kv_blocks(pool) > 0


def test_colocated_example_has_four_8b_workers():
    spec = load_spec("colocated-8b-h100")
    assert [w.id for w in spec.worker_list()] == ["both-0", "both-1", "both-2", "both-3"]
    assert not spec.disaggregated


def test_disaggregated_example_pairs_prefill_and_decode_over_infiniband():
    spec = load_spec("disagg-70b-h100")
    assert spec.disaggregated
    assert [w.id for w in spec.worker_list()] == ["prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2",
                                                  "decode-3"]
    assert spec.kv_transfer_link().name == "InfiniBand-NDR"
    dep = spec.deployment("decode")
    assert (dep.model.name, dep.tp, dep.tp_link.name) == ("Llama-3.1-70B", 4, "NVLink4")


def test_deployment_matches_the_roofline_inputs():
    spec = load_spec("default")
    dep = spec.deployment(spec.pools[0])
    assert isinstance(dep, roofline.Deployment)
    assert spec.kv_capacity_tokens(spec.pools[0]) == roofline.kv_capacity_tokens(dep, 0.9, 2.0)
    assert spec.host_swap_link().name == "PCIe-Gen5"


def test_per_pool_overrides_change_that_pool_only():
    spec = parse_spec(BASE + '[[pools]]\nrole = "prefill"\ntp = 2\n[[pools]]\nrole = "decode"\ngpu = "H200"\n'
                      + PD_ROUTER)
    assert spec.deployment("prefill").tp == 2 and spec.deployment("prefill").gpu.name == "H100-SXM"
    assert spec.deployment("decode").tp == 1 and spec.deployment("decode").gpu.name == "H200"


def test_ports_count_up_across_pools_unless_set():
    spec = parse_spec(BASE + '[[pools]]\nname = "a"\ncount = 2\n[[pools]]\nname = "b"\ncount = 1\n'
                      '[[pools]]\nname = "c"\nbase_port = 9000\ncount = 2\n')
    assert [(w.id, w.port) for w in spec.worker_list()] == [("a-0", 8100), ("a-1", 8101), ("b-0", 8102),
                                                            ("c-0", 9000), ("c-1", 9001)]


def test_yaml_spec_decodes_like_toml():
    pytest.importorskip("yaml")
    text = ("model: Llama-3.1-8B\ngpu: H100-SXM\npools:\n  - {role: prefill}\n  - {role: decode, count: 2}\n"
            "router: {policy: pd_pair}\n")
    assert [w.id for w in parse_spec(text, "yaml").worker_list()] == ["prefill-0", "decode-0", "decode-1"]


def test_user_catalog_adds_a_gpu(tmp_path):
    (tmp_path / "mine.toml").write_text(
        '[[gpu]]\nname = "H100-custom"\nbf16_tflops = 900.0\nfp8_tflops = 1800.0\nhbm_gb = 80.0\nhbm_tb_s = 3.0\n'
        'compute_efficiency = 0.6\nbandwidth_efficiency = 0.8\nlayer_overhead_us = 9.0\nintra_node_link = "NVLink4"\n')
    (tmp_path / "spec.toml").write_text('model = "Llama-3.1-8B"\ngpu = "H100-custom"\ncatalog = "mine.toml"\n'
                                        + ONE_POOL)
    assert load_spec(tmp_path / "spec.toml").deployment("both").gpu.hbm_tb_s == 3.0


BAD = [
    # (spec text, field blamed, words the reason must contain)
    ('model = "Llama-3.1-8B"\ngpu = "H101"\n' + ONE_POOL, "gpu", ["unknown gpu 'H101'", "H100-SXM"]),
    ('model = "Llama-9"\ngpu = "H100-SXM"\n' + ONE_POOL, "model", ["unknown model", "Llama-3.1-8B"]),
    (BASE + ONE_POOL + '[[pools]]\nname = "x"\ncount = -2\n', "pools[1].count", ["must be >= 1 (got -2)"]),
    (BASE + "tp = 3\n" + ONE_POOL, "tp", ["power of two", "got 3"]),
    (BASE + "tp = 16\n" + ONE_POOL, "tp", ["power of two", "got 16"]),
    (BASE + ONE_POOL + "tp = 6\n", "pools[0].tp", ["power of two"]),
    ('model = "Llama-3.1-70B"\ngpu = "H100-SXM"\ntp = 2\n' + ONE_POOL, "tp",
     ["does not fit", "weights need 70.6 GB/GPU vs 70.0 GB available"]),
    ('model = "Llama-3.1-70B"\ngpu = "L40S"\ntp = 4\n' + ONE_POOL, "tp",
     ["less than one 131072-token sequence", "max_model_len"]),
    ('model = "Llama-3.1-8B"\ngpu = "H100-SXM"\n[[pools]]\ngpu = "L40S"\n[engine]\ngpu_memory_utilization = 0.4\n',
     "pools[0].gpu", ["less than one 131072-token sequence"]),
    (BASE + '[[pools]]\nrole = "prefill"\n', "pools", ["no decode pool"]),
    (BASE + '[[pools]]\nrole = "decode"\n', "pools", ["no prefill pool"]),
    (BASE + '[[pools]]\nrole = "prefill"\n[[pools]]\nrole = "both"\n', "pools", ["colocated or disaggregated"]),
    (BASE + '[[pools]]\nrole = "prefil"\n', "pools[0].role", ["'prefil'", "both, prefill, decode"]),
    (BASE + "[[pools]]\ncoutn = 1\n", "pools[0].coutn", ["unknown field"]),
    (BASE + '[[pools]]\ncount = "two"\n', "pools[0].count", ["expected `int`, got `str`"]),
    (BASE + '[[pools]]\n[[pools]]\n', "pools[1].name", ["duplicate pool name 'both'"]),
    (BASE + '[[pools]]\nname = "Big Pool"\n', "pools[0].name", ["lowercase"]),
    (BASE, "pools", ["at least one"]),
    ('gpu = "H100-SXM"\n' + ONE_POOL, "model", ["required field missing"]),
    (BASE + 'kv_dtype = "fp4"\n' + ONE_POOL, "kv_dtype", ["unknown dtype 'fp4'"]),
    (BASE + 'catalog = "nope.toml"\n' + ONE_POOL, "catalog", ["file not found"]),
    (BASE + ONE_POOL + '[links]\nkv_transfer = "Carrier-Pigeon"\n', "links.kv_transfer", ["InfiniBand-NDR"]),
    (BASE + ONE_POOL + "[engine]\nblock_size = 12\n", "engine.block_size", ["power of two"]),
    (BASE + ONE_POOL + "[engine]\ntime_scale = 0.5\n", "engine.time_scale", [">= 1"]),
    (BASE + ONE_POOL + "[engine]\nhost_kv_gb = -1\n", "engine.host_kv_gb", [">= 0"]),
    (BASE + ONE_POOL + "[engine]\ngpu_memory_utilization = 1.5\n", "engine.gpu_memory_utilization", ["(0, 1]"]),
    (BASE + ONE_POOL + '[engine]\npreemption = "drop"\n', "engine.preemption", ["recompute, swap"]),
    (BASE + ONE_POOL + '[router]\npolicy = "random"\n', "router.policy", ["prefix_bounded"]),
    (BASE + '[[pools]]\nrole = "prefill"\n[[pools]]\nrole = "decode"\n[router]\npolicy = "kv_aware"\n',
     "router.policy", ["pd_pair"]),
    (BASE + ONE_POOL + "[router]\nmax_input_tokens = 200000\n", "router.max_input_tokens", ["exceeds"]),
    (BASE + ONE_POOL + "[router]\nprocesses = 0\n", "router.processes", ["> 0"]),
    (BASE + "[[pools]]\nbase_port = 8000\n", "pools[0].base_port", ["taken by the router"]),
    (BASE + ONE_POOL + '[[tenants]]\nname = "a"\napi_keys = ["k"]\n[[tenants]]\nname = "b"\napi_keys = ["k"]\n',
     "tenants[1].api_keys", ["already belongs to tenant 'a'"]),
    (BASE + ONE_POOL + '[[tenants]]\nname = "a"\nrequests_per_s = -1\n', "tenants[0].requests_per_s", ["> 0"]),
    (BASE + ONE_POOL + "[slo]\nttft_p99_s = 0\n", "slo.ttft_p99_s", ["> 0"]),
    (BASE + ONE_POOL + "[workload]\nmix = { chat = 1, video = 1 }\n", "workload.mix.video", ["unknown archetype"]),
    (BASE + ONE_POOL + "[workload]\ntenants = { ghost = 1 }\n", "workload.tenants.ghost", ["no such tenant"]),
    (BASE + ONE_POOL + '[workload.params.chat]\nunique_len = { median = "x" }\n',
     "workload.params.chat.unique_len.median", ["expected `float`"]),
    (BASE + "[[pools]\n", "<file>", ["not valid TOML"]),
]


@pytest.mark.parametrize("text, field, words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_field_fails_with_one_message_naming_it(text, field, words):
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    message = str(caught.value)
    assert caught.value.field == field
    assert message.startswith(f"spec error at {field}: ")
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_missing_spec_file_names_the_path(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.toml")
    with pytest.raises(SpecError, match="example spec"):
        load_spec("no-such-example")


def test_policy_settings_are_checked_by_the_policy_registry_naming_router_settings():
    from router.policies import registry
    spec = parse_spec(BASE + ONE_POOL + '[router]\nsettings = { epz = 0.1 }\n')
    with pytest.raises(SpecError) as err:
        registry.check_spec_settings(spec)
    assert err.value.field == "router.settings" and "epz" in err.value.reason


def test_the_spec_knows_exactly_the_policies_the_registry_builds():
    from emulator.spec import POLICIES
    from router.policies import registry
    assert POLICIES == tuple(registry.BUILDERS)
