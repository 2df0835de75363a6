"""A CycloneDX 1.5 SBOM of the installed Python environment (``fedproxy-secure sbom``).

Every distribution that ``importlib.metadata`` sees in the running interpreter's environment
becomes a ``library`` component with its name, version, PyPI package URL and declared license;
the distributions that ``fedproxy-secure`` needs at run time (its ``Requires-Dist`` closure, with
environment markers evaluated) are ``scope: required``, the rest (test tools, pip itself)
``scope: optional``. The dependency graph follows ``Requires-Dist`` between installed
distributions. Given a hash-pinned lock file (``requirements.lock``), each component whose exact
version is pinned there carries the lock's SHA-256 hashes of its release files, so the SBOM says
both what is installed and which artifacts were accepted. Serialised and (when ``jsonschema`` is
installed) validated with ``cyclonedx-python-lib``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from fedproxy_secure.errors import ConfigError

ROOT_DIST = "fedproxy-secure"
SPEC_VERSION = "1.5"
_LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def normalise(name: str) -> str:
    """PEP 503 normal form of a distribution name (``Foo_Bar.baz`` -> ``foo-bar-baz``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Dist:
    """One installed distribution: normalised name, version, license text and requirement names."""

    name: str
    version: str
    license: str | None
    requires: tuple[str, ...]
    summary: str = ""
    extras_requires: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)


def _license_of(md) -> str | None:
    """SPDX expression or license name from core metadata, or None when absent or a full license text."""
    expr = md.get("License-Expression")
    if expr:
        return expr.strip()
    lic = (md.get("License") or "").strip()
    if lic and lic.upper() != "UNKNOWN" and len(lic) <= 80 and "\n" not in lic:
        return lic
    for c in md.get_all("Classifier") or []:
        if c.startswith("License :: ") and not c.endswith(":: OSI Approved"):
            return c.split(" :: ")[-1]
    return None


def _requirements(md, env: dict[str, str]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(names required unconditionally, names per extra) from ``Requires-Dist``, markers evaluated in ``env``."""
    from packaging.requirements import InvalidRequirement, Requirement

    base: list[str] = []
    extras: dict[str, list[str]] = {}
    for line in md.get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        name = normalise(req.name)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            base.append(name)
            continue
        for extra in re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(req.marker)):
            if req.marker.evaluate({**env, "extra": extra}):
                extras.setdefault(normalise(extra), []).append(name)
    return tuple(sorted(set(base))), {k: tuple(sorted(set(v))) for k, v in extras.items()}


def _is_installed_record(d: metadata.Distribution) -> bool:
    """True for pip-installed ``.dist-info`` metadata (not a source tree's stale ``.egg-info``)."""
    return str(getattr(d, "_path", "")).endswith(".dist-info")


def installed_distributions() -> dict[str, Dist]:
    """Every distribution of the running environment, keyed by normalised name.

    When a name is found twice (e.g. a source checkout's ``*.egg-info`` on ``sys.path`` next to the
    installed ``*.dist-info``), the installed record wins, else the first on ``sys.path``.
    """
    from packaging.markers import default_environment

    env = default_environment()
    chosen: dict[str, metadata.Distribution] = {}
    for d in metadata.distributions():
        raw = d.metadata.get("Name")
        if not raw:
            continue
        name = normalise(raw)
        if name not in chosen or (_is_installed_record(d) and not _is_installed_record(chosen[name])):
            chosen[name] = d
    out: dict[str, Dist] = {}
    for name, d in chosen.items():
        md = d.metadata
        base, extras = _requirements(md, env)
        out[name] = Dist(name, d.version, _license_of(md), base, (md.get("Summary") or "").strip(), extras)
    return out


def runtime_closure(dists: dict[str, Dist], root: str = ROOT_DIST, extras: tuple[str, ...] = ()) -> set[str]:
    """Names of ``root`` and every installed distribution it needs at run time (plus ``extras``' needs)."""
    root = normalise(root)
    if root not in dists:
        raise ConfigError(f"sbom: {root} is not installed in this environment; install it (pip install -e .) first")
    todo = list(dists[root].requires) + [n for e in extras for n in dists[root].extras_requires.get(normalise(e), ())]
    seen = {root}
    while todo:
        n = todo.pop()
        if n in seen or n not in dists:
            continue
        seen.add(n)
        todo.extend(dists[n].requires)
    return seen


def read_lock_hashes(path: str | Path) -> dict[tuple[str, str], tuple[str, ...]]:
    """``{(name, version): sha256 hashes}`` of a pip hash-pinned requirements file (``name==v --hash=...``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--lock: cannot read {path}: {exc.strerror}") from None
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    cur: tuple[str, str] | None = None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _LOCK_LINE.match(s)
        if m:
            cur = (normalise(m.group(1)), m.group(2))
            out[cur] = ()
        if cur is not None:
            out[cur] = out[cur] + tuple(_HASH.findall(s))
    if not out:
        raise ConfigError(f"--lock: {path} pins no requirement (expected lines like 'name==1.0 --hash=sha256:...')")
    return out


def build_sbom(lock: str | Path | None = None, root: str = ROOT_DIST):
    """A ``cyclonedx.model.bom.Bom`` of the installed environment (see the module docstring)."""
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentScope, ComponentType
    from cyclonedx.factory.license import LicenseFactory
    from packageurl import PackageURL

    dists = installed_distributions()
    needed = runtime_closure(dists, root)
    hashes = read_lock_hashes(lock) if lock is not None else {}
    lf = LicenseFactory()

    def component(d: Dist, app: bool = False) -> Component:
        purl = PackageURL(type="pypi", name=d.name, version=d.version)
        licenses = []
        if d.license:
            try:
                licenses = [lf.make_from_string(d.license)]
            except Exception:  # an unparsable free-text license: leave it out rather than guess
                licenses = []
        return Component(
            name=d.name, version=d.version, bom_ref=purl.to_string(), purl=purl, description=d.summary or None,
            type=ComponentType.APPLICATION if app else ComponentType.LIBRARY,
            scope=None if app else (ComponentScope.REQUIRED if d.name in needed else ComponentScope.OPTIONAL),
            licenses=licenses,
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=h) for h in hashes.get((d.name, d.version), ())],
        )

    root_n = normalise(root)
    bom = Bom()
    comps = {n: component(d, app=(n == root_n)) for n, d in sorted(dists.items())}
    bom.metadata.component = comps[root_n]
    for n, c in comps.items():
        if n != root_n:
            bom.components.add(c)
    for n, d in dists.items():
        deps = [comps[r] for r in d.requires if r in comps and r != n]
        bom.register_dependency(comps[n], deps)
    return bom


def sbom_json(bom) -> str:
    """The BOM as CycloneDX 1.5 JSON text."""
    from cyclonedx.output.json import JsonV1Dot5

    return JsonV1Dot5(bom).output_as_string(indent=2)


def validate_sbom_json(text: str) -> str | None:
    """Schema errors of CycloneDX 1.5 JSON ``text`` (None when valid); needs ``jsonschema`` installed."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    err = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    return None if err is None else str(err)


def write_sbom(out: str | Path, lock: str | Path | None = None, validate: bool = True) -> dict:
    """Write the SBOM of the installed environment to ``out`` (refuses to overwrite); returns a summary.

    ``validate``: check against the CycloneDX 1.5 JSON schema before writing when ``jsonschema`` is
    importable (``ConfigError`` on a schema error, nothing written); the summary says whether it ran.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out: {out} exists; choose a new file name")
    bom = build_sbom(lock)
    text = sbom_json(bom)
    validated = False
    if validate:
        try:
            import jsonschema  # noqa: F401
        except ImportError:
            pass
        else:
            err = validate_sbom_json(text)
            if err is not None:
                raise ConfigError(f"sbom: the generated document breaks the CycloneDX 1.5 schema: {err[:300]}")
            validated = True
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    doc = json.loads(text)
    comps = doc.get("components", [])
    return {"out": str(out), "spec_version": doc["specVersion"], "components": len(comps),
            "required": sum(1 for c in comps if c.get("scope") == "required"),
            "with_hashes": sum(1 for c in comps if c.get("hashes")), "validated": validated}
