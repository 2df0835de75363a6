"""Run-config validation: bad configs are refused before any work, naming the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedproxy_secure.config import load_run_config, parse_run_config
from fedproxy_secure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("tiny*.yaml"))


def _base(tmp_path: Path) -> dict:
    return yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text()) | {
        "data": {"dir": str(ROOT / "examples" / "data" / "bigbench-mini")}
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_is_valid(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.data.dir.is_dir()


def test_typo_key_names_field_and_suggests(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["train"] = {"lerning_rate": 0.1}
    with pytest.raises(ConfigError) as exc:
        parse_run_config(data)
    assert "train.lerning_rate" in str(exc.value) and "unknown field" in str(exc.value)


def test_negative_learning_rate_names_field_and_value(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["train"] = {"lr": -0.001}
    with pytest.raises(ConfigError) as exc:
        parse_run_config(data)
    msg = str(exc.value)
    assert "train.lr" in msg and "-0.001" in msg and "greater than 0" in msg


def test_missing_data_folder(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["data"] = {"dir": str(tmp_path / "nope")}
    with pytest.raises(ConfigError) as exc:
        parse_run_config(data)
    assert "data.dir" in str(exc.value) and "does not exist" in str(exc.value)


@pytest.mark.parametrize(
    "section,value,field",
    [
        ("compress", {"keep_ratio": 1.5}, "compress.keep_ratio"),
        ("aggregator", {"name": "krum"}, "aggregator.name"),
        ("secagg", {"mode": "masking", "threshold": 9}, "secagg.threshold"),
        ("clients", {"count": 0}, "clients.count"),
        ("dp", {"enabled": True, "delta": 2.0}, "dp.delta"),
    ],
)
def test_more_bad_values(tmp_path: Path, section: str, value: dict, field: str) -> None:
    data = _base(tmp_path)
    data[section] = value
    with pytest.raises(ConfigError) as exc:
        parse_run_config(data)
    assert field in str(exc.value)


def test_both_model_sources_refused(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["model"] = {"llm": str(tmp_path), "tiny": {"arch": "llama"}}
    with pytest.raises(ConfigError, match="model"):
        parse_run_config(data)


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda d: d["train"].update({"lerning_rate": 1}), "train.lerning_rate"),
        (lambda d: d["train"].update({"lr": -1}), "train.lr"),
        (lambda d: d["data"].update({"dir": "/nonexistent/folder"}), "data.dir"),
    ],
)
def test_cli_refuses_bad_config_with_one_line(tmp_path: Path, edit, field: str) -> None:
    data = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    data["data"]["dir"] = str(ROOT / "examples" / "data" / "bigbench-mini")
    edit(data)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "simulate", "--config", str(cfg), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert field in lines[0]
    assert not (tmp_path / "o").exists()  # refused before any work
