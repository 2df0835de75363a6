"""The client report schema, defined once: what a site may tell the server after a round.

The server needs only what it enforces (issue 20, a minimal client report): which round, the site's
privacy accounting (ε spent so far, δ, accountant) and a status. No training loss, norm, example
count, sample rate or timing is part of it. The site builds its report with
:func:`fedproxy_secure.client.report.public_report`; the server accepts one only through
:func:`check_client_report`; the auditor compares stored reports with :data:`CLIENT_REPORT_KEYS`.
"""

from __future__ import annotations

import math

from fedproxy_secure.errors import ProtocolAbort

__all__ = ["CLIENT_REPORT_KEYS", "STATUS_TRAINED", "TEXT_MAX", "check_client_report"]

#: the only keys a client report may hold (the site sends exactly these, the server accepts no other)
CLIENT_REPORT_KEYS = ("round_id", "epsilon", "delta", "accountant", "status")

#: status of a report posted after local training finished and the update went into secure aggregation
STATUS_TRAINED = "trained"

#: the longest ``accountant`` / ``status`` string a report may carry
TEXT_MAX = 32


def check_client_report(report: object, round_id: int | None = None) -> dict:
    """``report`` if it is a minimal client report, else ProtocolAbort naming the offending field.

    Guarantees on return: a dict whose keys are all in :data:`CLIENT_REPORT_KEYS`; ``round_id`` (if
    present) an int equal to ``round_id`` when given; ``epsilon`` / ``delta`` finite numbers >= 0;
    ``accountant`` / ``status`` strings of at most :data:`TEXT_MAX` characters. Pure.
    """
    if not isinstance(report, dict):
        raise ProtocolAbort("report must be a JSON object")
    extra = sorted(set(report) - set(CLIENT_REPORT_KEYS))
    if extra:
        raise ProtocolAbort(f"report field {extra[0]!r} is not accepted: a client report holds only "
                            f"{list(CLIENT_REPORT_KEYS)} (keep training statistics on the site)")
    rid = report.get("round_id")
    if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool) or (round_id is not None and rid != round_id)):
        raise ProtocolAbort(f"report field 'round_id' = {rid!r}: must be the round id of the path ({round_id})")
    for k in ("epsilon", "delta"):
        v = report.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0):
            raise ProtocolAbort(f"report field {k!r} = {v!r}: must be a finite number >= 0")
    for k in ("accountant", "status"):
        v = report.get(k)
        if v is not None and (not isinstance(v, str) or len(v) > TEXT_MAX):
            raise ProtocolAbort(f"report field {k!r}: must be a string of at most {TEXT_MAX} characters")
    return report
