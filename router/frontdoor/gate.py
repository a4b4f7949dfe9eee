"""The router's front door: API keys to tenants, tenant limits and load shedding, as HTTP answers.

It wires the pure parts (router.frontdoor.tenants, router.frontdoor.admission) to the request path: 401 for a missing
or unknown key when keys are configured, 429 with Retry-After when a tenant is over a limit, 503
with Retry-After when the cluster's queue is past what the TTFT SLO allows (`DrainLimit`), each with
an OpenAI error body (the server counts refusals by status, reason and tenant). A request admitted
here is settled exactly once when it ends (``release``): its concurrency slot freed and its token reservation reconciled
with the tokens it really used.

Tenant salts: a salted tenant's prompts are hashed with a salt derived from a router secret and the
tenant's salt, so no client (of any tenant) can send a salt that collides with it.
"""
from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable

from kvlab.wire.openai_api import ApiError
from router.config import SheddingConfig
from router.frontdoor.admission import STATUS, Admission, RateMeter, reject
from router.frontdoor.job import Job
from router.frontdoor.tenants import TenantConfig, Tenants

SALT_PREFIX = "kvlab-tenant:"


class Gate:
    def __init__(self, tenants: list[TenantConfig], shedding: SheddingConfig,
                 queue_depth: Callable[[], float], salt_secret: str | None = None,
                 clock: Callable[[], float] = time.monotonic, prefill_workers: Callable[[], int] | None = None,
                 make_tenants: Callable[[list[TenantConfig], float], Tenants] = Tenants):
        self.clock = clock
        self.tenants = make_tenants(tenants, clock())   # several processes: router.shared_state's table
        self.keys_required = any(t.api_keys for t in tenants)
        self.queue_depth = queue_depth
        self.shedder = DrainLimit(shedding, prefill_workers, clock()) if shedding.enabled else None
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
        """Shed or admit `job`, before its prompt is tokenized (a refused request costs no tokenizing):
        a tenant's token bucket reserves the prompt estimate + max_tokens, settled at ``release``
        with the prompt tokens the worker reported. On success job.ticket must later go to ``release``."""
        now = self.clock()
        if self.shedder is not None:
            self._raise_if_refused(self.shedder.check(self.queue_depth(), now), job.tenant)
        if job.tenant is not None:
            admission = self.tenants.admit(job.tenant, job.prompt_estimate + job.max_tokens, now)
            self._raise_if_refused(admission, job.tenant)
            job.ticket = admission

    def release(self, job: Job, completion_tokens: int, served: bool = True) -> None:
        """Settle an admitted request: its tokens are the worker-reported prompt plus `completion_tokens`;
        one refused before a worker served it (`served` False) used none."""
        if self.shedder is not None:
            self.shedder.finished(self.clock())
        ticket, job.ticket = job.ticket, None
        if ticket is not None:
            used = job.prompt_tokens + completion_tokens if served else 0
            self.tenants.release(ticket, used, self.clock())

    def _raise_if_refused(self, admission: Admission, tenant: str | None) -> None:
        if admission.ok:
            return
        status = STATUS.get(admission.reason or "", 429)   # a refusal always has a reason
        headers = {}
        if admission.retry_after is not None and math.isfinite(admission.retry_after):
            headers["Retry-After"] = str(max(1, math.ceil(admission.retry_after)))
        kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
        raise ApiError(status, admission.message, type_=kind, code=admission.reason, headers=headers)


class DrainLimit:
    """How many requests may wait before a new one would miss the TTFT SLO, from the drain rate.

    A prefill-capable worker empties its queue at mu = 1 / drain_s requests per second (its time per
    request when the backlog packs steps full), and a request that joins as the k-th in line (itself
    counted, the remainder of the step in progress taken as one more place) gets its first token after
    about k / mu + S (S: its own prefill). The SLO therefore allows k <= mu (SLO - S) places, i.e. a
    request is shed once the requests already waiting fill

        Q_max = workers x floor(mu x (SLO - S))

    which does not move with the arrival rate: arrivals count the very requests being shed, so a
    limit of lambda x SLO grows with the overload it should stop (2.6x overload: TTFT p99 at 2.8x
    its target, shedding in waves). Without a known drain_s, mu is measured from finished requests
    (cluster-wide), never below a floor of `min_queue` so an idle cluster takes a burst.

    The SLO is a p99, though, and the mean rule puts the last admitted request at the SLO only on
    average: a spec-built config carries `places`, the line sized for the p99 wait from the
    workload's spread (router.frontdoor.drain.p99_places), which replaces floor(mu (SLO - S)).
    """

    def __init__(self, config: SheddingConfig, workers: Callable[[], int] | None, now: float,
                 min_queue: float = 8.0):
        self.slo_s = config.ttft_slo_s
        self.prefill_s = config.prefill_s or 0.0
        self.drain_s = config.drain_s if config.drain_s and workers is not None else None
        self.places = config.places
        self.workers = workers
        self.min_queue = min_queue
        self.done = RateMeter(now=now)

    def finished(self, now: float) -> None:
        self.done.observe(now)

    def drain_rate(self, now: float) -> float:
        """Requests per second the cluster's queues empty at."""
        if self.drain_s is not None and self.workers is not None:   # drain_s is set only with workers
            return max(0, self.workers()) / self.drain_s
        return self.done.rate(now)

    def line(self) -> int | None:
        """Places in one worker's line (its drain time known), else None: the limit is cluster-wide."""
        if self.drain_s is None or self.workers is None:
            return None
        places = self.places if self.places is not None else \
            math.floor(max(0.0, self.slo_s - self.prefill_s) / self.drain_s)
        # At least one: a request that finds its worker's line empty is served as soon as it can be,
        # so refusing it helps no other request (an SLO below one prefill would refuse all).
        return max(1, places)

    def max_queue(self, now: float) -> float:
        line = self.line()
        if line is not None and self.workers is not None:
            return max(0, self.workers()) * line
        slack = max(0.0, self.slo_s - self.prefill_s)
        return max(self.min_queue, math.floor(self.drain_rate(now) * slack))

    def check(self, queue_depth: float, now: float) -> Admission:
        limit = self.max_queue(now)
        if queue_depth + 1 <= limit:        # its own place in line included
            return Admission(ok=True)
        mu = self.drain_rate(now)
        drain = (queue_depth + 1 - limit) / mu if mu > 0 else self.slo_s
        return reject("overloaded", f"{queue_depth:g} requests are queued; beyond {limit:.0f} the first token "
                                    f"would miss the {self.slo_s:g} s TTFT target", retry_after=drain)
