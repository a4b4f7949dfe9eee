"""Load tests for OpenAI-compatible LLM endpoints: Locust users, open-loop arrivals, trace replay, the
capacity sweep (``kvlab sweep``) and the routing-policy comparison (``kvlab compare``).

Locustfiles (each usable with plain ``locust -f ... --host URL``):
  locustfile.py   closed-loop users for the workload archetypes (chat, RAG, code, agentic) and tenants
  open_loop.py    open-loop arrivals (Poisson or gamma, constant/step/burst rate) independent of responses
  trace_user.py   replays a Mooncake-style trace at its own timestamps
  shapes.py       step and burst user-count shapes for the closed-loop users
"""
