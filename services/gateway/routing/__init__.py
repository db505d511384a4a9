"""Routing: which deployment answers a request, and how a canary moves through its steps.

- :mod:`.policy`: the pure canary decision (advance / promote / roll back / hold).
- :mod:`.stats`: live per-deployment outcomes (errors, latency) feeding the policy.
- :mod:`.table`: the in-memory route table (upstreams, sticky weighted choice, breakers).
- :mod:`.state`: route state transitions in the DB, each with its ``RolloutChanged`` event.
"""
