"""The wire protocol both parties import (client and server never import each other).

* :mod:`.codec` — the one base64 / vector codec.
* :mod:`.canonical` — the one canonical JSON, with its float policy.
* :mod:`.names` — stage names, signature domains, default deadlines.
* :mod:`.threshold` — the one threshold rule.
* :mod:`.roundcfg` — round-config signing/verification and the global-state codec.
* :mod:`.settings` — the operator's federation settings (pydantic).
* :mod:`.he_wire`, :mod:`.sa_hties_wire` — messages and checks of those modes.
* :mod:`.modes` — the mode registry; each secure-aggregation mode is one file there.

Importing this package is cheap: submodules are imported where they are used.
"""
