"""The router's front door: API keys to tenants, tenant limits and load shedding, as HTTP answers.

It wires the pure parts (router.frontdoor.tenants, router.frontdoor.admission) to the request path: 401 for a missing
or unknown key when keys are configured, 429 with Retry-After when a tenant is over a limit, 503
with Retry-After when the cluster's queue is past what the TTFT SLO allows (Little's law), each with
an OpenAI error body (the server counts refusals by status, reason and tenant). A request admitted here is settled exactly
once when it ends (``release``): its concurrency slot freed and its token reservation reconciled
with the tokens it really used.

Tenant salts: a salted tenant's prompts are hashed with a salt derived from a router secret and the
tenant's salt, so no client (of any tenant) can send a salt that collides with it.
"""
from __future__ import annotations

import hashlib
import math
import secrets
import time
from typing import Callable

from kvlab.wire.openai_api import ApiError
from router.frontdoor.admission import STATUS, Admission, LoadShedder, RateMeter
from router.config import SheddingConfig
from router.frontdoor.job import Job
from router.frontdoor.tenants import TenantConfig, Tenants

SALT_PREFIX = "kvlab-tenant:"


class Gate:
    def __init__(self, tenants: list[TenantConfig], shedding: SheddingConfig,
                 queue_depth: Callable[[], float], salt_secret: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.tenants = Tenants(tenants, clock())
        self.keys_required = any(t.api_keys for t in tenants)
        self.queue_depth = queue_depth
        self.shedder = LoadShedder(shedding.ttft_slo_s) if shedding.enabled else None
        self.arrivals = RateMeter(now=clock())
        self._secret = (salt_secret or secrets.token_hex(16)).encode()
        self._salts: dict[str, str | None] = {}

    # -- who is asking ---------------------------------------------------------------------------
    def tenant_of(self, authorization: str | None) -> str | None:
        """The tenant of the request's Bearer key; None when no keys are configured."""
        if not self.keys_required:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        tenant = self.tenants.tenant_for_key(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    def salt(self, tenant: str | None) -> str | None:
        """The forced cache salt of a salted tenant (None: the tenant shares the cache)."""
        if tenant is None:
            return None
        if tenant not in self._salts:
            base = self.tenants.salt(tenant)
            digest = hashlib.sha256(self._secret + b"\0" + base.encode()).hexdigest()[:24] if base else None
            self._salts[tenant] = SALT_PREFIX + digest if digest else None
        return self._salts[tenant]

    # -- admission -------------------------------------------------------------------------------
    def precheck(self, tenant: str | None) -> None:
        """Refuse what needs no token count (a tenant at its limits) before the prompt is read."""
        if tenant is not None:
            refusal = self.tenants.peek(tenant, self.clock())
            if refusal is not None:
                self._raise_if_refused(refusal, tenant)

    def admit(self, job: Job) -> None:
        """Shed or admit `job`; on success job.ticket must later go to ``release``."""
        now = self.clock()
        self.arrivals.observe(now)
        if self.shedder is not None:
            self._raise_if_refused(self.shedder.check(self.queue_depth(), self.arrivals.rate(now)), job.tenant)
        if job.tenant is not None:
            admission = self.tenants.admit(job.tenant, len(job.prompt) + job.max_tokens, now)
            self._raise_if_refused(admission, job.tenant)
            job.ticket = admission

    def release(self, job: Job, completion_tokens: int) -> None:
        ticket, job.ticket = job.ticket, None
        if ticket is not None:
            self.tenants.release(ticket, len(job.prompt) + completion_tokens, self.clock())

    def _raise_if_refused(self, admission: Admission, tenant: str | None) -> None:
        if admission.ok:
            return
        status = STATUS.get(admission.reason, 429)
        headers = {}
        if admission.retry_after is not None and math.isfinite(admission.retry_after):
            headers["Retry-After"] = str(max(1, math.ceil(admission.retry_after)))
        kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
        raise ApiError(status, admission.message, type_=kind, code=admission.reason, headers=headers)
