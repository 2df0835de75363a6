"""Threat models: one YAML file per threat under ``threat_models/``, validated by a pydantic schema.

Each file names the threat's STRIDE and/or LINDDUN category, the asset at risk, the adversary,
the attack (with literature references), the mitigation in this code base (file and function),
the residual risk in plain words, its severity (``low`` | ``medium`` | ``high`` | ``critical``:
the harm if the attack succeeded against an unmitigated deployment), the pytest node ids that
exercise the mitigation and, optionally, the ``audit check`` controls that relate to it. :func:`load_threat_models` refuses a
file that breaks the schema; :func:`collect_test_ids` lists the test ids of ``tests/`` (by parsing
the files with ``ast``, no import) so a test can prove that every cited id exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.strict import StrictModel

STRIDE = ("Spoofing", "Tampering", "Repudiation", "Information disclosure", "Denial of service",
          "Elevation of privilege")
LINDDUN = ("Linking", "Identifying", "Non-repudiation", "Detecting", "Data disclosure", "Unawareness",
           "Non-compliance")
ASSETS = ("client data", "LLM IP", "proxy", "global model", "keys", "audit log")
ADVERSARIES = ("honest-but-curious server", "malicious server", "colluding clients", "network attacker",
               "malicious client", "insider")
SEVERITIES = ("low", "medium", "high", "critical")
TEST_ID_RE = re.compile(r"^tests/[A-Za-z0-9_/]+\.py::[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)?$")


class Category(StrictModel):
    """STRIDE and LINDDUN categories (at least one entry in total)."""

    stride: list[Literal[STRIDE]] = Field(default_factory=list)  # type: ignore[valid-type]
    linddun: list[Literal[LINDDUN]] = Field(default_factory=list)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _some(self) -> "Category":
        if not self.stride and not self.linddun:
            raise ValueError("give at least one STRIDE or LINDDUN category")
        return self


class Attack(StrictModel):
    """What the adversary does, with at least one literature reference."""

    summary: str = Field(min_length=20)
    references: list[str] = Field(min_length=1)


class Mitigation(StrictModel):
    """One mitigation: a repository file, a function/class in it (``name`` or ``Class.method``), how it helps."""

    file: str
    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
    how: str = Field(min_length=10)


class ThreatModel(StrictModel):
    """One threat: the schema every ``threat_models/*.yaml`` file must follow."""

    id: str = Field(pattern=r"^T\d{2}$")
    title: str = Field(min_length=5)
    severity: Literal[SEVERITIES]  # type: ignore[valid-type]
    category: Category
    asset: list[Literal[ASSETS]] = Field(min_length=1)  # type: ignore[valid-type]
    adversary: list[Literal[ADVERSARIES]] = Field(min_length=1)  # type: ignore[valid-type]
    attack: Attack
    mitigation: list[Mitigation] = Field(min_length=1)
    residual_risk: str = Field(min_length=20)
    tests: list[str] = Field(min_length=1)
    controls: list[str] = Field(default_factory=list)

    @field_validator("tests")
    @classmethod
    def _test_ids(cls, v: list[str]) -> list[str]:
        for t in v:
            if not TEST_ID_RE.match(t):
                raise ValueError(f"test id {t!r} is not a pytest node id like tests/test_x.py::test_name")
        return v


def load_threat_model(path: str | Path) -> ThreatModel:
    """Parse and validate one threat YAML file; ``ConfigError`` names the file and field on failure."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read threat model: {exc}") from None
    try:
        tm = ThreatModel.model_validate(data)
    except ValidationError as exc:
        probs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: threat model does not match the schema: {probs}") from None
    if path.stem.split("-")[0].upper() != tm.id:
        raise ConfigError(f"{path}: file name must start with the threat id {tm.id} (e.g. {tm.id.lower()}-name.yaml)")
    return tm


def load_threat_models(directory: str | Path) -> list[ThreatModel]:
    """All threat models of ``directory`` (``*.yaml``), sorted by id; refuses duplicate ids."""
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(f"{directory}: no threat model files (*.yaml)")
    models = [load_threat_model(f) for f in files]
    ids = [m.id for m in models]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{directory}: duplicate threat ids {dupes}")
    return sorted(models, key=lambda m: m.id)


def collect_test_ids(tests_dir: str | Path, root: str | Path | None = None) -> set[str]:
    """Pytest node ids (``tests/f.py::func`` and ``tests/f.py::Class::method``) found by parsing files.

    Parametrised tests are listed by their base name. Files are parsed, never imported.
    """
    tests_dir = Path(tests_dir)
    root = Path(root) if root is not None else tests_dir.parent
    ids: set[str] = set()
    for f in sorted(tests_dir.rglob("test_*.py")):
        rel = f.relative_to(root).as_posix()
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                ids.add(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                for m in node.body:
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name.startswith("test"):
                        ids.add(f"{rel}::{node.name}::{m.name}")
    return ids


def defined_names(path: str | Path) -> set[str]:
    """Top-level function/class names of a Python file, plus ``Class.method`` for methods."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{m.name}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for m in ast.walk(node):  # nested helpers (closures such as create_app's routes)
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m is not node:
                    names.add(f"{node.name}.{m.name}")
    return names


def missing_references(models: list[ThreatModel], root: str | Path) -> list[str]:
    """Problems with the cited tests and mitigations: unknown test ids, missing files or functions."""
    root = Path(root)
    known = collect_test_ids(root / "tests", root)
    problems: list[str] = []
    for m in models:
        for t in m.tests:
            if t not in known:
                problems.append(f"{m.id}: test id {t} does not exist in the suite")
        for mit in m.mitigation:
            p = root / mit.file
            if not p.is_file():
                problems.append(f"{m.id}: mitigation file {mit.file} does not exist")
            elif p.suffix == ".py" and mit.function not in defined_names(p):
                problems.append(f"{m.id}: {mit.file} defines no {mit.function}")
    return problems
