"""Hash-pinned lock files (``requirements.lock``, ``requirements-test.lock``): read and de-duplicate.

``make`` installs both files in one ``pip install --require-hashes`` call; a distribution pinned in
both would be listed twice, so :func:`dedupe` removes from the second file every entry the first
already pins (``make lock`` runs it: ``python -m fedproxy_secure.audit.lockfile dedupe TEST RUNTIME``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fedproxy_secure.audit.sbom import normalise, read_lock_hashes

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==")
NOTE = ("# Entries already pinned in {runtime} are removed from this file by "
        "'python -m fedproxy_secure.audit.lockfile dedupe';\n# install both files together.\n")


def dedupe_text(text: str, pinned: set[str], runtime_name: str) -> tuple[str, list[str]]:
    """``text`` without the blocks (pin line, hashes, ``# via`` comments) of names in ``pinned``.

    Pure. Returns the new text (with a note after the header, added once) and the removed names.
    """
    out: list[str] = []
    keep, removed = True, []
    for line in text.splitlines():
        m = _PIN.match(line)
        if m:
            keep = normalise(m.group(1)) not in pinned
            if not keep:
                removed.append(normalise(m.group(1)))
        elif line.startswith("# The following packages"):
            keep = True
        if keep:
            out.append(line)
    new = "\n".join(out) + "\n"
    note = NOTE.format(runtime=runtime_name)
    if note not in new:
        first_pin = next((i for i, l in enumerate(out) if _PIN.match(l)), len(out))
        new = "\n".join(out[:first_pin]) + ("\n" if first_pin else "") + note + "\n".join(out[first_pin:]) + "\n"
    return new, removed


def dedupe(path: str | Path, against: str | Path) -> list[str]:
    """Rewrite lock file ``path`` without the distributions lock file ``against`` pins; returns their names."""
    path, against = Path(path), Path(against)
    pinned = {n for n, _ in read_lock_hashes(against)}
    new, removed = dedupe_text(path.read_text(encoding="utf-8"), pinned, against.name)
    path.write_text(new, encoding="utf-8")
    return removed


def main(argv: list[str] | None = None) -> int:
    """``dedupe TEST_LOCK RUNTIME_LOCK``: exit 0 after rewriting TEST_LOCK, 2 on a usage error."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "dedupe":
        print("usage: python -m fedproxy_secure.audit.lockfile dedupe TEST_LOCK RUNTIME_LOCK", file=sys.stderr)
        return 2
    removed = dedupe(args[1], args[2])
    print(f"{args[1]}: removed {len(removed)} entries pinned in {args[2]}: {', '.join(removed) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
