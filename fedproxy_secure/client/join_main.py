"""Light entry point for a joining client (no typer/torch import unless the trainer needs it).

``python -m fedproxy_secure.client.join_main --enrol DIR --state DIR [--trainer synthetic]``
writes a JSON summary to ``--out``. ``--die-at ROUND:STAGE`` crashes the process there (tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from fedproxy_secure.client.join import join_federation, synthetic_train_fn


def main(argv: list[str] | None = None) -> int:
    """Run one client until the federation ends; exit 0."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--enrol", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--server", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--die-at", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    die = None
    if a.die_at:
        r, st = a.die_at.split(":")
        die = (int(r), st)
    log = (lambda m: None) if a.quiet else (lambda m: print(f"[{a.seed}] {m}", file=sys.stderr, flush=True))
    res = join_federation(a.enrol, a.state, synthetic_train_fn(a.seed, a.scale), a.server, log=log, die_at=die)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(asdict(res), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
