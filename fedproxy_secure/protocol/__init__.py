"""The wire protocol both parties import (client and server never import each other).

* :mod:`.names` — stage names, signature domains, default deadlines.
* :mod:`.roundcfg` — round-config signing/verification and the global-state codec.
* :mod:`.settings` — the operator's federation settings (pydantic).
* :mod:`.he_wire`, :mod:`.sa_hties_wire` — messages and checks of those modes.
* :mod:`.modes` — the mode registry; each secure-aggregation mode is one file there.

The wire primitives it builds on (codec, canonical JSON, threshold rule, key-agreement binding)
live one layer down in :mod:`fedproxy_secure.wire`, below ``secagg`` and ``artifacts``, which this
package imports.

Importing this package is cheap: submodules are imported where they are used.
"""
