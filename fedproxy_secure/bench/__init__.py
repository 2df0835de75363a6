"""What an operator sizes a deployment with, shipped in the wheel: ``bench secagg`` (:mod:`.secagg_bench`),
``bench he`` (:mod:`.he_bench`) and ``bench bundle-verify`` (:mod:`.bundle_verify_bench`).

The research drivers (quality, fusion, recipe, scale, client-dp, ...) are not part of the SDK: they live in the
top-level ``benchmarks/`` folder of a checkout (import name ``fedproxy_benchmarks``), beside ``results/``.
"""
