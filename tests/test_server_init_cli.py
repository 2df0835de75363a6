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


# ---------------------------------------------------------------- server init --bundle --keyset --config
from fedproxy_secure.errors import ConfigError, SecurityError  # noqa: E402
from tests.fed_bundle_helpers import tiny_bundle, write_yaml  # noqa: E402


@pytest.fixture(scope="module")
def signed_tiny(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _lora_count_from_config(proxy_cfg: dict, r: int, ffa: bool, targets: list[str]) -> int:
    """Trainable LoRA values of a Llama proxy, from its config.json alone (B: out x r; A: r x in)."""
    h, i, layers = proxy_cfg["hidden_size"], proxy_cfg["intermediate_size"], proxy_cfg["num_hidden_layers"]
    kv = h // proxy_cfg["num_attention_heads"] * proxy_cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    per = sum(r * out + (0 if ffa else r * fin) for t, (fin, out) in shapes.items() if t in targets)
    return layers * per


@pytest.mark.parametrize("lora, targets", [
    ("{r: 4, alpha: 8, ffa: true}", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("{r: 2, alpha: 4, ffa: false, target_modules: [q_proj, down_proj]}", ["q_proj", "down_proj"]),
])
def test_init_from_bundle_dim_is_the_proxys_trainable_lora_count(tmp_path, signed_tiny, lora, targets):
    bundle, ks = signed_tiny
    cfg = write_yaml(tmp_path / "federation.yaml", f"url: https://127.0.0.1:9443\nrounds: 2\nlora: {lora}\n")
    d = tmp_path / "srv"
    r = CliRunner().invoke(app, ["server", "init", "--dir", str(d), "--bundle", str(bundle), "--keyset", str(ks),
                                 "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    import yaml

    lcfg = yaml.safe_load(lora)
    want = _lora_count_from_config(json.loads((bundle / "config.json").read_text()), lcfg["r"], lcfg["ffa"], targets)
    s = load_settings(d)
    assert s.dim == want and f"dim {want}" in " ".join(r.output.split())
    assert s.rounds == 2 and s.train["lora"]["r"] == lcfg["r"] and s.train["dp"]["enabled"] is True
    assert isinstance(s.a_seed, int) and 0 <= s.a_seed < 2**63
    dep = json.loads((d / "deployment.json").read_text())
    assert dep["url"] == "https://127.0.0.1:9443" and dep["port"] == 9443 and dep["lora_dim"] == want
    assert (d / "bundle" / "MANIFEST.sig").is_file() and (d / "keys" / "keyset.json").read_bytes() == ks.read_bytes()


@pytest.mark.parametrize("opt", [["--dim", "16"], ["--rounds", "5"]])
def test_init_with_bundle_refuses_hand_set_values(tmp_path, signed_tiny, opt):
    bundle, ks = signed_tiny
    d = tmp_path / "srv"
    r = CliRunner().invoke(app, ["server", "init", "--dir", str(d), "--bundle", str(bundle), "--keyset", str(ks), *opt])
    assert r.exit_code != 0
    assert opt[0] in " ".join(r.output.replace("│", " ").split())
    assert not d.exists()


def test_federation_yaml_may_not_set_dim_or_a_seed(tmp_path, signed_tiny):
    bundle, ks = signed_tiny
    for key in ("dim: 16", "a_seed: 7"):
        cfg = write_yaml(tmp_path / "federation.yaml", f"rounds: 2\n{key}\n")
        d = tmp_path / "srv"
        r = CliRunner().invoke(app, ["server", "init", "--dir", str(d), "--bundle", str(bundle), "--keyset", str(ks),
                                     "--config", str(cfg)])
        assert isinstance(r.exception, ConfigError) and key.split(":")[0] in str(r.exception)
        assert not d.exists()


def test_federation_yaml_errors_name_the_field(tmp_path, signed_tiny):
    bundle, ks = signed_tiny
    cfg = write_yaml(tmp_path / "federation.yaml", "rounds: 0\nurl: http://x\n")
    r = CliRunner().invoke(app, ["server", "init", "--dir", str(tmp_path / "srv"), "--bundle", str(bundle),
                                 "--keyset", str(ks), "--config", str(cfg)])
    assert isinstance(r.exception, ConfigError)
    assert "rounds" in str(r.exception) and "url" in str(r.exception)


def test_init_refuses_a_bundle_that_does_not_verify_against_the_keyset(tmp_path, signed_tiny):
    from fedproxy_secure.artifacts import create_keyset, generate_key, save_keyset

    bundle, _ = signed_tiny
    other = tmp_path / "other.json"
    save_keyset(create_keyset(generate_key(), name="test-fed"), other)
    d = tmp_path / "srv"
    r = CliRunner().invoke(app, ["server", "init", "--dir", str(d), "--bundle", str(bundle), "--keyset", str(other)])
    assert isinstance(r.exception, SecurityError)
    assert not d.exists()


@pytest.mark.parametrize("unset", [False, True])
def test_engine_signs_the_stored_a_seed_in_every_round(tmp_path, unset):
    """Round 1 aborted, round 2 opened: both round configs carry federation.json's a_seed (or, for
    settings built without one, a seed drawn once and kept in the store)."""
    from fedproxy_secure.artifacts.keys import generate_key
    from fedproxy_secure.auditlog import AuditLog
    from fedproxy_secure.server.rounds import RoundEngine, sign_round_config
    from fedproxy_secure.server.store import SQLiteStore

    d = tmp_path / "srv"
    assert init(d, "--min-clients", "2", "--threshold", "2", "--mode", "plain").exit_code == 0
    s = load_settings(d)
    stored = json.loads((d / "federation.json").read_text())["a_seed"]
    assert s.a_seed == stored is not None
    if unset:
        s.a_seed = None
    store = SQLiteStore(d / "state.db")
    op = generate_key()
    eng = RoundEngine(store, AuditLog(d / "audit.jsonl"), s, signer=lambda cfg, *a: sign_round_config(op, cfg, *a))
    ids = [store.enroll(store.add_token(n, 60), bytes([i + 1]) * 32)[0] for i, n in enumerate(["a", "b"])]
    eng.recover()
    seeds = []
    for rid in (1, 2):
        for c in ids:
            eng.submit(c, rid, "join", {"type": "join"})
        cfg = store.get_round(rid).config
        assert cfg["round_id"] == rid
        seeds.append(cfg["a_seed"])
        eng.abort(rid, "test: next round")
    kept = store.get_meta("a_seed")
    store.close()
    if unset:
        assert kept is not None and seeds == [int(kept)] * 2
    else:
        assert seeds == [stored, stored]


def test_folder_without_a_seed_gets_one_stored_once(tmp_path):
    d = tmp_path / "srv"
    assert init(d).exit_code == 0
    raw = json.loads((d / "federation.json").read_text())
    raw["a_seed"] = None
    (d / "federation.json").write_text(json.dumps(raw))
    first = load_settings(d).a_seed
    assert first is not None and json.loads((d / "federation.json").read_text())["a_seed"] == first
    assert load_settings(d).a_seed == first


def test_start_refuses_a_bundle_the_federation_was_not_made_from(tmp_path, signed_tiny):
    bundle, _ = signed_tiny
    d = tmp_path / "legacy"
    assert init(d, "--dim", "16").exit_code == 0
    r = CliRunner().invoke(app, ["server", "start", "--dir", str(d), "--bundle", str(bundle), "--port", "1"])
    assert isinstance(r.exception, ConfigError) and "made without a bundle" in str(r.exception)


def test_start_refuses_another_bundle_than_the_federations(tmp_path, signed_tiny):
    bundle, ks = signed_tiny
    d = tmp_path / "srv"
    r = CliRunner().invoke(app, ["server", "init", "--dir", str(d), "--bundle", str(bundle), "--keyset", str(ks)])
    assert r.exit_code == 0, r.output
    other, _ = tiny_bundle(tmp_path / "other")  # another operator's bundle: does not verify against this keyset
    r = CliRunner().invoke(app, ["server", "start", "--dir", str(d), "--bundle", str(other), "--port", "1"])
    assert isinstance(r.exception, SecurityError)
