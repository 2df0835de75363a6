"""`server init --aggregator/--h-norm`: valid values land in the server's federation.json (and in
the settings the server loads); invalid ones exit non-zero naming the option, creating nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import fedproxy_secure.cli.server_net  # noqa: F401  (registers the command)
from fedproxy_secure.cli.app import app
from fedproxy_secure.server.setup import load_settings


def init(d, *args: str):
    return CliRunner().invoke(app, ["server", "init", "--dir", str(d), *args])


@pytest.mark.parametrize("h_norm", ["reveal", "none"])
def test_valid_aggregator_and_h_norm_are_stored(tmp_path, h_norm):
    d = tmp_path / "srv"
    r = init(d, "--aggregator", "sa_hties", "--h-norm", h_norm, "--min-clients", "3", "--threshold", "3")
    assert r.exit_code == 0, r.output
    cfg = json.loads((d / "federation.json").read_text())
    assert cfg["aggregator"] == "sa_hties" and cfg["sa_hties"] == {"h_norm": h_norm}
    s = load_settings(d)
    assert s.aggregator == "sa_hties" and s.sa_hties["h_norm"] == h_norm


def test_defaults_fedavg_and_sa_hties_reveal(tmp_path):
    r = init(tmp_path / "a")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "a" / "federation.json").read_text())
    assert cfg["aggregator"] == "fedavg" and cfg["sa_hties"] == {}
    r = init(tmp_path / "b", "--aggregator", "sa_hties")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "federation.json").read_text())["sa_hties"] == {"h_norm": "reveal"}


@pytest.mark.parametrize("args, option, words", [
    (["--aggregator", "hties"], "--aggregator", ["hties", "fedavg", "sa_hties"]),
    (["--aggregator", "sa_hties", "--h-norm", "bogus"], "--h-norm", ["bogus", "reveal", "none"]),
    (["--h-norm", "none"], "--h-norm", ["only with --aggregator sa_hties"]),  # would be silently ignored
])
def test_invalid_value_exits_non_zero_naming_the_option(tmp_path, args, option, words):
    d = tmp_path / "srv"
    r = init(d, *args)
    assert r.exit_code != 0
    out = " ".join(r.output.replace("│", " ").split())  # rich draws and wraps the usage error box
    assert option in out, out
    for w in words:
        assert w in out, (w, out)
    assert not (d / "federation.json").exists() and not (d / "pki").exists()  # nothing was created
