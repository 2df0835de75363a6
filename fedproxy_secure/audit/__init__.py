"""The auditor's tools, on top of the client and the server.

* :mod:`.check` — ``audit check``: the deployment a server folder runs (read through
  :mod:`fedproxy_secure.server.folder`), a YAML config, a site's pinned policy;
* :mod:`.controls` — the controls evaluated on that deployment view (pure);
* :mod:`.threats` — the threat models under ``threat_models/``;
* :mod:`.sbom`, :mod:`.lockfile` — supply chain (SBOM, hash-pinned lock files).

The tamper-evident log that the server, the sites and serving write is one layer down, in
:mod:`fedproxy_secure.auditlog`; nothing below this package imports it.
"""
