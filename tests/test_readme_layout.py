"""The README's layout names every top-level package and module of the SDK, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedproxy_secure"


def _layout_block() -> list[str]:
    """The lines of the README's ``## Layout`` code block that describe ``fedproxy_secure/``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1].splitlines()
    start = next(i for i, line in enumerate(block) if line.startswith("fedproxy_secure/"))
    out = []
    for line in block[start + 1:]:
        if line and not line.startswith(" "):  # the next top-level folder (examples/, results/, ...)
            break
        out.append(line)
    return out


def _named(lines: list[str]) -> set[str]:
    """Names the block gives: ``name/`` for a package, ``name.py`` for a module (first column only)."""
    names: set[str] = set()
    for line in lines:
        if not line.startswith("  ") or line.startswith("   "):  # a continuation line describes, never names
            continue
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        names.update(tok for tok in head.split() if tok.endswith("/") or tok.endswith(".py"))
    return names


def _on_disk() -> set[str]:
    pkgs = {f"{p.name}/" for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    mods = {p.name for p in PKG.glob("*.py") if p.name != "__init__.py"}
    return pkgs | mods


def test_readme_layout_names_every_top_level_package_and_module() -> None:
    named, real = _named(_layout_block()), _on_disk()
    assert "client/" in real and "server/" in real  # the scan itself works
    assert not real - named, f"README ## Layout does not name {sorted(real - named)} under fedproxy_secure/"
    assert not named - real, f"README ## Layout names {sorted(named - real)}, which fedproxy_secure/ no longer has"
