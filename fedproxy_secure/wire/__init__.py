"""Wire primitives: the lowest layer every party shares (imports nothing of the SDK but ``errors``).

* :mod:`.codec` — the one base64 / vector codec.
* :mod:`.canonical` — the one canonical JSON, with its float policy.
* :mod:`.threshold` — the one threshold rule (and the SecAgg+ graph degree).
* :mod:`.binding` — what every site binds into a round's key agreement (config digest, commit-reveal
  graph seed, phase-B context).

These sit below ``secagg``, ``artifacts``, ``transport``, ``protocol`` and the audit log, so none of
those imports another upwards to reach them (the layers contract in ``pyproject.toml``).
Importing this package is cheap: submodules are imported where they are used.
"""
