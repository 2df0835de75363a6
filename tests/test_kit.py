"""Site kits: what `server enroll SITE --out kit.zip` writes and the server keeps, and how
`client join --kit` unpacks one (exact file set, secrets 0600, resume, refusals)."""

from __future__ import annotations

import json
import stat
import zipfile

import pytest
from typer.testing import CliRunner

import fedproxy_secure.cli.server_net  # noqa: F401  (registers the commands)
from fedproxy_secure.cli.app import app
from fedproxy_secure.client.join_config import load_join_config
from fedproxy_secure.client.kit import KIT_FILES, unpack_kit
from fedproxy_secure.errors import ConfigError, SecurityError
from fedproxy_secure.server.fed_config import FederationFile
from fedproxy_secure.server.setup import init_from_bundle
from tests.fed_bundle_helpers import tiny_bundle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kitfed")
    bundle, ks = tiny_bundle(tmp)
    fed = FederationFile.model_validate({"url": "https://127.0.0.1:9555", "rounds": 2,
                                         "dp": {"enabled": True, "epsilon": 4.0, "delta": 1e-6}})
    init_from_bundle(tmp / "srv", fed, bundle, ks)
    return tmp / "srv"


def enroll(d, site, out):
    return CliRunner().invoke(app, ["server", "enroll", site, "--dir", str(d), "--out", str(out)])


def test_kit_has_exactly_the_kit_files_and_the_server_keeps_no_secret(server, tmp_path):
    kit = tmp_path / "site-a.zip"
    r = enroll(server, "site-a", kit)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(kit.stat().st_mode) == 0o600
    with zipfile.ZipFile(kit) as zf:
        assert sorted(zf.namelist()) == sorted(KIT_FILES)
        info = json.loads(zf.read("server.json"))
        policy = json.loads(zf.read("policy.json"))
        assert zf.read("keyset.json") == (server / "keys" / "keyset.json").read_bytes()
        assert zf.read("ca.pem") == (server / "pki" / "ca.pem").read_bytes()
        assert zf.read("operator.pub") == (server / "keys" / "operator.pub").read_bytes()
        bodies = [zf.read(n) for n in zf.namelist()]
    assert not any(b"PRIVATE KEY" in b for b in bodies)  # no private key of anyone in the kit
    assert info["url"] == "https://127.0.0.1:9555" and info["name"] == "site-a"
    assert info["enrol_url"] == "https://127.0.0.1:9556"  # the CSR enrolment listener: port + 1
    assert policy["dp_required"]["epsilon"] == 4.0 and policy["rounds"] == 2 and policy["lora_dim"] > 0
    assert not (server / "enrol" / "site-a").exists()  # no handover folder: nothing of the site's is kept
    with zipfile.ZipFile(kit) as zf:
        token = zf.read("token").strip()
    assert all(token.split(b".")[1] not in p.read_bytes() for p in server.rglob("*") if p.is_file())  # hash only
    rec = json.loads((server / "kits" / "site-a.json").read_text())
    assert rec["site"] == "site-a" and len(rec["sha256"]) == 64 and rec["enrol"] == "csr" and rec["cert_days"] == 30


def test_a_site_gets_one_kit_and_bad_names_are_refused(server, tmp_path):
    assert enroll(server, "site-b", tmp_path / "b.zip").exit_code == 0
    again = enroll(server, "site-b", tmp_path / "b2.zip")
    assert isinstance(again.exception, ConfigError) and "already has a kit" in str(again.exception)
    bad = enroll(server, "../evil", tmp_path / "e.zip")
    assert isinstance(bad.exception, ConfigError) and not (tmp_path / "e.zip").exists()


def test_unpack_writes_a_valid_client_yaml_with_dp_from_the_policy_and_secrets_0600(server, tmp_path):
    kit = tmp_path / "c.zip"
    assert enroll(server, "site-c", kit).exit_code == 0
    data = tmp_path / "my.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1?", "response": "2"}) + "\n")
    site = tmp_path / "site"
    cfg_path = unpack_kit(kit, site, data)
    cfg = load_join_config(cfg_path)
    assert cfg.data == data.resolve() and cfg.enrolment == site.resolve()
    assert cfg.keyset == (site / "keyset.json").resolve() and cfg.dp.enabled and cfg.dp.epsilon == 4.0
    assert cfg.dp.delta == 1e-6
    assert "#" in cfg_path.read_text()  # commented for the site's operator
    assert stat.S_IMODE(site.stat().st_mode) == 0o700
    assert stat.S_IMODE((site / "token").stat().st_mode) == 0o600
    assert not (site / "client.key").exists()  # made at first join, not shipped
    # rerun with the same kit (resume): kept; another kit into the same folder: refused
    (site / "state").mkdir()
    (site / "state" / "enrolment.json").write_text("{}")
    assert unpack_kit(kit, site, data) == cfg_path and (site / "state" / "enrolment.json").exists()
    other = tmp_path / "d.zip"
    assert enroll(server, "site-d", other).exit_code == 0
    with pytest.raises(ConfigError, match="another site kit"):
        unpack_kit(other, site, data)


def test_unpack_refuses_foreign_entries(server, tmp_path):
    kit = tmp_path / "e.zip"
    assert enroll(server, "site-e", kit).exit_code == 0
    data = tmp_path / "my.jsonl"
    data.write_text("{}\n")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(kit) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
        dst.writestr("../../outside.txt", b"x")
    with pytest.raises(SecurityError, match="unexpected entry"):
        unpack_kit(evil, tmp_path / "site", data)
    assert not (tmp_path / "site").exists() and not (tmp_path.parent / "outside.txt").exists()
    short = tmp_path / "short.zip"
    with zipfile.ZipFile(kit) as src, zipfile.ZipFile(short, "w") as dst:
        dst.writestr("ca.pem", src.read("ca.pem"))
    with pytest.raises(ConfigError, match="missing"):
        unpack_kit(short, tmp_path / "site2", data)


def test_join_sends_library_warnings_to_the_state_log_and_keeps_its_own(tmp_path, monkeypatch):
    import warnings

    from fedproxy_secure.cli.client_join import _library_noise_to

    console: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda m, *a, **k: console.append(str(m)))  # restored after
    log = tmp_path / "state" / "warnings.log"
    _library_noise_to(log)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("noisy library", FutureWarning, "/venv/site-packages/transformers/x.py", 1)
        warnings.warn_explicit("15 of 16 examples exceed max_length", UserWarning,
                               "/src/fedproxy_secure/client/trainer.py", 2)
    text = log.read_text()
    assert "noisy library" in text and "exceed max_length" not in text
    assert console == ["15 of 16 examples exceed max_length"]
