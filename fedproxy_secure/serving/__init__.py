"""Serving the fused LLM to the federation's own sites (``server serve-model``), one job per module.

- :mod:`~fedproxy_secure.serving.settings`: what the operator configures (``serve.yaml``, options);
- :mod:`~fedproxy_secure.serving.requests`: the request bodies (pydantic) and ``stop`` rules;
- :mod:`~fedproxy_secure.serving.prompting`: chat template or the plain one, stop strings, stream prefixes;
- :mod:`~fedproxy_secure.serving.generation`: greedy decoding, one token per step;
- :mod:`~fedproxy_secure.serving.limits`: per-site request bucket and daily token quota;
- :mod:`~fedproxy_secure.serving.scheduler`: a queue per site, fair token steps between them;
- :mod:`~fedproxy_secure.serving.access`: the site of a client certificate, enrolment and revocation;
- :mod:`~fedproxy_secure.serving.audit_sink`: constant-cost appends to the federation's audit log;
- :mod:`~fedproxy_secure.serving.app`: the OpenAI-compatible routes;
- :mod:`~fedproxy_secure.serving.service`: verify and load the fused folder, run uvicorn with mTLS.

Imports nothing heavy at package level: ``fastapi``, ``torch`` and ``uvicorn`` load with the modules
that need them. The serving layer sits on top of ``server`` (its folder, store and TLS); nothing in
``server`` or ``client`` imports it (import-linter contracts).
"""
