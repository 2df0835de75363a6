"""Federation-wide round-config fields pinned at the first accepted round, kept in the site's state folder.

FFA-LoRA keeps A fixed for the whole federation: the global state θ is B for one A, drawn from
``a_seed`` over one LoRA layout (``train.lora``: rank, alpha, target modules) of one size
(``dim``). A server that changes any of these between rounds changes what the site's update means
(and what it reveals), so the first round config the site accepts pins them in
``state_dir/federation_pins.json`` (0600, written atomically) and every later config must carry the
same values, across restarts of the client process. A mismatch is a
:class:`~fedproxy_secure.client.policy.PolicyViolation` naming the field, raised before anything is
fetched or trained. Deleting the file (a new federation) is the site operator's decision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedproxy_secure.client.policy import PolicyViolation
from fedproxy_secure.errors import SecurityError
from fedproxy_secure.wire.canonical import canonical_json

__all__ = ["PINS_FILE", "PINNED_FIELDS", "check_and_pin", "load_pins"]

PINS_FILE = "federation_pins.json"
#: round-config fields pinned at the first accepted round (dotted: a key inside a section)
PINNED_FIELDS = ("a_seed", "dim", "train.lora")


def _get(cfg: dict, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def load_pins(state_dir: str | os.PathLike) -> dict | None:
    """The pins of this state folder, or None before the first accepted round.

    Raises ``SecurityError`` if the file exists but is not what :func:`check_and_pin` wrote.
    """
    p = Path(state_dir) / PINS_FILE
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{p}: unreadable federation pins ({exc}); restore it from a backup or, for a new "
                            "federation, delete it deliberately") from None
    if not isinstance(data, dict) or not isinstance(data.get("fields"), dict) \
            or set(data["fields"]) != set(PINNED_FIELDS):
        raise SecurityError(f"{p}: malformed federation pins; restore it or delete it deliberately")
    return data


def check_and_pin(state_dir: str | os.PathLike, cfg: dict) -> None:
    """Refuse ``cfg`` if a pinned field differs from the pins; pin them if this is the first round.

    ``cfg`` is the signature- and policy-checked round config. Compares canonical JSON, so a field
    absent at the first round must stay absent. Raises :class:`PolicyViolation` (field, the value
    the server sent, the pinned value and the round it was pinned at).
    """
    pins = load_pins(state_dir)
    rid = cfg.get("round_id")
    now = {f: _get(cfg, f) for f in PINNED_FIELDS}
    if pins is None:
        body = {"pinned_at_round": rid, "kid": str(cfg.get("kid", "")), "fields": now}
        p = Path(state_dir) / PINS_FILE
        tmp = p.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(body, sort_keys=True, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        return
    for f in PINNED_FIELDS:
        was = pins["fields"][f]
        if canonical_json(now[f]) != canonical_json(was):
            raise PolicyViolation(f, now[f], f"pinned at round {pins.get('pinned_at_round')}: {was!r}", rid,
                                  f"{f} is fixed for the whole federation (FFA-LoRA keeps one A); the pins are in "
                                  f"the state folder's {PINS_FILE}")
