"""Research drivers of fedproxy-secure (import name ``fedproxy_benchmarks``), outside the SDK wheel.

Experiment code with fixed task lists, issue targets and plots: the ``fedproxy-secure bench quality |
fusion | recipe | scale | client-dp | aggregate`` commands load these modules from a checkout (``make venv``
installs this folder editable); ``net_load``, ``compress_smollm`` and ``flower_scale`` run with ``python -m
fedproxy_benchmarks.<name>``. They use only the SDK's public names. What an operator sizes a deployment
with (``bench secagg``, ``bench he``, ``bench bundle-verify``) stays in :mod:`fedproxy_secure.bench`.
Figures land in the checkout's ``results/`` folder, beside this one.
"""
