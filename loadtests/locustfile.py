"""Closed-loop Locust users for the workload archetypes, with a tenant mix and per-tenant API keys.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000                 # web UI
    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 2m --host URL --mix chat=3,rag=1,agentic=1
    locust -f loadtests/locustfile.py --spec default --host URL                    # kvlab spec's mix and tenants
    locust -f loadtests/locustfile.py,loadtests/shapes.py --shape step ...          # a 2.5x user step

Each user sends a request, waits for the whole stream, thinks, and sends again (Locust's closed loop:
the offered load follows the server's speed; see open_loop.py for arrivals that do not wait). TTFT,
ITL, E2E and TOKENS appear as rows of their own in Locust's statistics. Works against kvlab's router
or any OpenAI-compatible server (--model, default: the server's first model; --api-key or per-tenant
keys from --spec).
"""
import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except ImportError:  # a plain checkout, not installed: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from locust import User, between, events, task

import loadtests.options  # noqa: F401  (registers --model, --mix, --spec, ...)
from loadtests.client import client_for
from loadtests.options import load_config, mix_from_options
from loadtests.payloads import pick
from loadtests.request_pool import RequestPool

_pools: dict[str, RequestPool] = {}


def _pool(environment, archetype: str) -> RequestPool:
    if archetype not in _pools:
        config = load_config(environment)
        _pools[archetype] = RequestPool(archetype, config.params.get(archetype), config.seed)
    return _pools[archetype]


class _LLMUser(User):
    abstract = True
    archetype = "chat"
    wait_time = between(1, 5)   # a person reading the answer before the next question (wall seconds)

    def on_start(self):
        config = load_config(self.environment)
        self.client = client_for(self.environment)
        self.rng = np.random.default_rng([config.seed, id(self) % 2**32])
        self.tenant = pick(self.rng, config.tenants)   # a user belongs to one tenant (its API key)

    def _send(self, request, messages=None):
        request.tenant = self.tenant
        return self.client.send(request, name=self.archetype, messages=messages)


class ChatUser(_LLMUser):
    """Short questions behind a handful of shared system prompts."""
    archetype = "chat"

    @task
    def ask(self):
        self._send(_pool(self.environment, self.archetype).next())


class RagUser(ChatUser):
    """Questions over shared documents of a few thousand tokens: long shared prefixes, short answers."""
    archetype = "rag"


class CodeUser(ChatUser):
    """A shared system prompt plus a long private code context; longer answers."""
    archetype = "code"


class AgentUser(_LLMUser):
    """Multi-turn sessions: every turn resends the whole history, including the server's real answers."""
    archetype = "agentic"
    wait_time = between(0.5, 2)   # tool calls between turns

    @task
    def session(self):
        answers: list[str] = []
        for turn in _pool(self.environment, self.archetype).next_session():
            result = self._send(turn, messages=_with_answers(turn.messages, answers))
            if not result.ok:
                return                      # a failed turn ends the session, as a real agent would
            answers.append(result.text)
            self.wait()


def _with_answers(messages, answers: list[str]):
    """The turn's history with its assistant messages replaced by what the server really answered."""
    out, k = [], 0
    for m in messages:
        if m["role"] == "assistant" and k < len(answers):
            m = {"role": "assistant", "content": answers[k]}
            k += 1
        out.append(m)
    return out


@events.test_start.add_listener
def _warm_pools(environment, **_):
    """Generate each archetype's first batch before users start: generation blocks every greenlet, and
    a stall inside the test would show up as latency that is not the server's."""
    mix = mix_from_options(environment.parsed_options) or dict.fromkeys(_USERS, 1.0)
    for name, weight in mix.items():
        if weight > 0 and environment.host:
            _pool(environment, name).warm()


_USERS = {"chat": ChatUser, "rag": RagUser, "code": CodeUser, "agentic": AgentUser}


@events.init.add_listener
def _apply_mix(environment, **_):
    """--mix (or --spec's workload.mix) sets the user classes' weights; weight-0 archetypes are left out.
    Without either, all four archetypes run with equal weights."""
    mix = mix_from_options(environment.parsed_options)
    if not mix:
        return
    chosen = [cls for name, cls in _USERS.items() if mix.get(name, 0) > 0]
    for cls in chosen:
        cls.weight = max(1, round(10 * mix[cls.archetype] / max(mix.values())))
    if chosen and set(environment.user_classes) >= set(_USERS.values()):   # only when the user named none
        environment.user_classes[:] = chosen
