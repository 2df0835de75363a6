"""Hardening of config reading (issue 17): every YAML config goes through ``read_yaml_mapping``, which
refuses YAML aliases (alias bombs), files over 1 MiB, non-UTF-8 text and folders, each with one line
naming the file and the fix; error messages never repr a whole value."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from fedproxy_secure.config import (MAX_CONFIG_BYTES, MAX_REPR_CHARS, load_run_config, parse_run_config,
                                    read_yaml_mapping, short_repr)
from fedproxy_secure.errors import ConfigError
from tests.net_helpers import ROOT, env


def billion_laughs(path: Path, levels: int = 10) -> Path:
    """The classic alias bomb (about 1 KB): ``levels`` anchors of 10 aliases each, 10**levels leaves."""
    lines = ["laugh0: &laugh0 [" + ", ".join(['"lol"'] * 10) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"laugh{i}: &laugh{i} [" + ", ".join([f"*laugh{i - 1}"] * 10) + "]")
    lines += ["name: run", f"model: {{tiny: {{layers: *laugh{levels}}}}}", "data: {dir: .}"]
    path.write_text("\n".join(lines) + "\n")
    return path


_LOADERS = """
from fedproxy_secure.audit.check import load_deployment
from fedproxy_secure.client.join_config import load_join_config
from fedproxy_secure.client.local import load_client_train_config
from fedproxy_secure.config import load_run_config
from fedproxy_secure.pipelines.demo_config import load_demo_spec
LOADERS = {"simulate": load_run_config, "demo": lambda p: load_demo_spec(None, p), "client join": load_join_config,
           "client train": load_client_train_config, "audit check": load_deployment}
"""


def test_alias_bomb_is_refused_by_the_one_reader_in_a_line_naming_aliases(tmp_path):
    bomb = billion_laughs(tmp_path / "bomb.yaml")
    assert 1000 < bomb.stat().st_size < 2048
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(bomb)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(err.value) == (f"config {bomb}: line 1: YAML anchors/aliases (&name, *name, <<) are not allowed in "
                              "fedproxy-secure configs (fix: write the values out in full)")
    assert peak < 5 << 20 and elapsed < 2.0, (peak, elapsed)


def test_alias_bomb_is_refused_by_every_config_loader_under_a_1_gib_memory_cap(tmp_path):
    """Every config loader (simulate, demo, client join, client train, audit check) goes through the
    one reader: each refuses the bomb in a child capped at 1 GiB of address space, so a regression
    fails this test instead of taking the machine down (the unfixed reader needed more than 4 GB)."""
    bomb = billion_laughs(tmp_path / "bomb.yaml")
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n" + _LOADERS + textwrap.dedent(f"""
        import time
        from fedproxy_secure.errors import ConfigError
        for name, load in LOADERS.items():
            t0 = time.perf_counter()
            try:
                load({str(bomb)!r})
            except ConfigError as exc:
                print(name, "|", round(time.perf_counter() - t0, 3), "|", exc)
            else:
                print(name, "| ACCEPTED")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ", 2) for line in r.stdout.splitlines()]
    assert [x[0] for x in rows] == ["simulate", "demo", "client join", "client train", "audit check"], r.stdout
    for name, secs, msg in rows:
        assert "YAML anchors/aliases" in msg and "bomb.yaml" in msg, (name, msg)
        assert float(secs) < 1.0, (name, secs)


def test_a_single_anchor_is_refused_and_a_plain_config_still_loads(tmp_path):
    p = tmp_path / "anchor.yaml"
    p.write_text("name: run\nclients: &c {count: 2}\n")
    with pytest.raises(ConfigError, match=r"line 2: YAML anchors/aliases .* \(fix: write the values out in full\)"):
        read_yaml_mapping(p)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: 'star * and amp & in a string'\nclients: {count: 2}\n")
    assert read_yaml_mapping(ok) == {"name": "star * and amp & in a string", "clients": {"count": 2}}


def test_error_messages_cap_the_repr_of_a_huge_value(tmp_path):
    huge = [["lol"] * 1000] * 1000  # 10**6 leaves: its full repr is ~7 MB
    with pytest.raises(ConfigError) as err:
        parse_run_config({"model": {"tiny": {"layers": huge}}, "data": {"dir": str(tmp_path)}})
    msg = str(err.value)
    assert "model.tiny.layers = [" in msg and "valid integer" in msg
    assert len(msg) < 2 * MAX_REPR_CHARS + 200, len(msg)
    assert len(short_repr("x" * 10**6)) <= MAX_REPR_CHARS and short_repr(3) == "3"


def test_config_over_1_mib_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a" * (2 << 20))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_run_config(big)
    assert time.perf_counter() - t0 < 0.5
    assert str(err.value) == (f"--config: {str(big)!r} is larger than the 1048576 bytes (1 MiB) a config may have; "
                              "pass the YAML config, not a data or model file")
    edge = tmp_path / "edge.yaml"  # exactly at the limit: read and parsed
    head = b"name: edge\n"
    edge.write_bytes(head + b"#" * (MAX_CONFIG_BYTES - len(head) - 1) + b"\n")
    assert edge.stat().st_size == MAX_CONFIG_BYTES and read_yaml_mapping(edge) == {"name": "edge"}


def test_non_utf8_config_names_the_file_and_the_encoding(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_run_config(p)
    assert str(err.value) == f"--config: {str(p)!r} is not UTF-8 text (byte 9: b'\\xe9'); save it as UTF-8"


def test_config_that_is_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass the YAML file itself"):
        load_run_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_exits_2_for_each_bad_config(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    bomb = billion_laughs(tmp_path / "bomb.yaml")
    cases = [(["simulate", "--config", str(tmp_path)], "is a directory"),
             (["simulate", "--config", str(latin)], "is not UTF-8 text"),
             (["client", "join", "--config", str(bomb)], "aliases"),
             (["demo", "--config", str(bomb), "--out", str(tmp_path / "o")], "aliases")]
    for args, want in cases:
        r = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", *args], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr[-2000:])
        err = " ".join(r.stderr.split())
        assert want in err and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path / "o").exists()


def test_a_site_kit_whose_client_yaml_is_an_alias_bomb_is_refused(tmp_path):
    """``client join --kit``: the operator's client.yaml template goes through the same reader."""
    import zipfile

    from fedproxy_secure.client.kit import KIT_FILES, unpack_kit

    bomb = billion_laughs(tmp_path / "bomb.yaml").read_bytes()
    kit = tmp_path / "kit.zip"
    with zipfile.ZipFile(kit, "w") as zf:
        for name in KIT_FILES:
            zf.writestr(name, bomb if name == "client.yaml" else b"x")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ConfigError, match=r"line 1: YAML anchors/aliases"):
        unpack_kit(kit, tmp_path / "site", data)
