"""Tenant priority classes reach the workers as vLLM's `priority` field, set by the router, never the client."""
from types import SimpleNamespace

from kvlab.wire.openai_api import PRIORITY_CLASSES
from router.frontdoor.tenants import TenantConfig, Tenants
from router.server import Router

TENANTS = Tenants([TenantConfig(name="chat", api_keys=["k1"]), TenantConfig(name="bulk", api_keys=["k2"],
                                                                           priority="batch")])


def forced(tenant: str | None, client_priority: int = 0) -> dict:
    job = SimpleNamespace(request=SimpleNamespace(priority=client_priority), fields={})
    Router._force_priority(SimpleNamespace(gate=SimpleNamespace(tenants=TENANTS)), job, tenant)
    return job.fields


def test_interactive_comes_before_batch():
    assert PRIORITY_CLASSES["interactive"] < PRIORITY_CLASSES["batch"]   # vLLM: lower is scheduled first
    assert TENANTS.priority_of("chat") == PRIORITY_CLASSES["interactive"]
    assert TENANTS.priority_of("bulk") == PRIORITY_CLASSES["batch"]
    assert TENANTS.priority_of(None) == PRIORITY_CLASSES["interactive"]


def test_a_batch_tenants_requests_carry_its_priority_whatever_the_client_sends():
    assert forced("bulk") == {"priority": 1}
    assert forced("bulk", client_priority=-100) == {"priority": 1}


def test_a_client_cannot_jump_the_queue_with_its_own_priority():
    assert forced("chat", client_priority=-100) == {"priority": 0}
    assert forced(None, client_priority=-5) == {"priority": 0}
    assert forced("chat") == {}   # nothing to override: the body goes upstream untouched
