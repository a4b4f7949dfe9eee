"""`kvlab router` flags, specs and config files turn into the RouterConfig the server runs."""
import argparse
import json

import pytest

from emulator.spec import load_spec
from router.cli import add_arguments, config_from_args

_DEFAULT = load_spec("default")


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_workers_flag_takes_urls_ids_and_roles():
    config, host, port = parse("--workers", "http://a:1,d0=http://b:2/#decode,p0=http://c:3#prefill",
                               "--policy", "pd_pair", "--port", "9000")
    assert [(w.id, w.url, w.role) for w in config.workers] == [
        ("a:1", "http://a:1", "both"), ("d0", "http://b:2", "decode"), ("p0", "http://c:3", "prefill")]
    assert (config.policy, host, port) == ("pd_pair", "127.0.0.1", 9000)


def test_policy_settings_are_parsed_as_json_when_they_can_be():
    config, _, _ = parse("--policy", "prefix_bounded", "--policy-setting", "eps=0.5",
                         "--policy-setting", "prefix_blocks=2", "--admin-token", "t", "--kv-events", "zmq")
    assert config.policies == {"prefix_bounded": {"eps": 0.5, "prefix_blocks": 2}}
    assert (config.admin_token, config.kv_events) == ("t", "zmq")


def test_a_spec_gives_workers_tenants_limits_and_the_slo_in_wall_seconds():
    config, host, port = parse("--spec", "default")
    assert port == 8000 and [w.id for w in config.workers] == ["both-0", "both-1"]
    assert config.policy == "prefix_bounded" and config.policies["prefix_bounded"]["eps"] == 0.25
    assert config.shedding.enabled and config.shedding.ttft_slo_s == pytest.approx(
        _DEFAULT.slo.ttft_p99_s * _DEFAULT.engine.time_scale)   # emulated SLO x time scale = wall seconds
    disagg, _, _ = parse("--spec", "disagg-70b-h100", "--max-input-tokens", "1000")
    assert {w.role for w in disagg.workers} == {"prefill", "decode"} and disagg.policy == "pd_pair"
    assert disagg.limits.max_input_tokens == 1000


def test_a_config_file_is_read_and_flags_override_it(tmp_path):
    path = tmp_path / "router.json"
    path.write_text(json.dumps({"workers": [{"url": "http://w:1", "id": "w"}], "policy": "round_robin",
                                "tenants": [{"name": "t", "api_keys": ["k"], "requests_per_s": 5}]}))
    config, _, _ = parse("--config", str(path), "--policy", "least_loaded")
    assert config.policy == "least_loaded" and config.workers[0].id == "w"
    assert config.tenants[0].requests_per_s == 5


def test_the_salt_secret_comes_from_a_file_the_spec_names_or_the_environment(tmp_path, monkeypatch):
    from emulator.spec import example_spec_path
    from router.config import SheddingConfig
    from router.frontdoor.gate import Gate
    from router.frontdoor.tenants import TenantConfig
    (tmp_path / "salt.key").write_text("s3cret-from-file\n")
    spec = example_spec_path("colocated-8b-h100").read_text().replace(
        "[router]", '[router]\nsalt_secret_file = "salt.key"', 1)
    (tmp_path / "spec.toml").write_text(spec)
    config, _, _ = parse("--spec", str(tmp_path / "spec.toml"))
    assert config.salt_secret == "s3cret-from-file"
    monkeypatch.setenv("KVLAB_SALT_SECRET", "from-env")
    assert parse()[0].salt_secret == "from-env"
    assert parse("--salt-secret-file", str(tmp_path / "salt.key"))[0].salt_secret == "s3cret-from-file"
    # Two routers (or one restarted) with the same secret give a salted tenant the same cache salt.
    tenant = [TenantConfig("b", ["k"], cache_salt=True)]
    salts = {Gate(tenant, SheddingConfig(), lambda: 0.0, parse()[0].salt_secret).salt("b") for _ in range(2)}
    assert len(salts) == 1
