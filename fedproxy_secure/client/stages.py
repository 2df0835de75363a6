"""The client's secure-aggregation stages for a round: built by the mode named in the signed config.

Every mode's client stage machine lives with its server stage machine in
:mod:`fedproxy_secure.protocol.modes`; this module is the client's entry point to them.
"""

from __future__ import annotations

from fedproxy_secure.protocol.modes import ClientStages, make_client_stages

__all__ = ["ClientStages", "make_client_stages"]
