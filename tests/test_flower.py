"""FedProxy as a Flower app (``fedproxy_secure.flower``): Flower's simulation engine against ``simulate``.

flwr lives in the overlay venv ``.venv/flower`` (``make venv`` builds it from requirements-flower.lock;
docs/flower.md says why it is not in ``.venv``), so every Flower step runs there in a subprocess with
one torch thread; the ``simulate`` side runs in ``.venv``'s own Python, as users run it.

* ``test_flower_secaggplus_sa_hties_matches_simulate``: a seeded 4-client tiny-model run, SA-H-TIES
  + PCR, 2 rounds. Flower: every sum through Flower's SecAgg+ (3 neighbours, threshold 2, clip range
  1, 2^22 quantisation levels). ``simulate``: our masking. Same config file, same proxy, same data
  split, same A seed. θ after each round must agree: max |Δθ| ≤ ATOL and ‖Δθ‖/‖θ‖ ≤ RTOL. Both sums
  quantise (SecAgg+: stochastic rounding, step 2/2^22 ≈ 4.8e-7 per value per client), so exact
  equality is not expected; measured here: max |Δθ| ≈ 1.4e-6, relative ≈ 1.2e-5 at ‖θ‖ ≈ 1.1.
  Local batches cover each client's 8 examples, so batch order (OS entropy) cannot change the update.
* ``test_flower_secaggplus_fedavg_matches_simulate``: FedAvg under SecAgg+ (one SecAgg+ run per
  round, the clients' example counts as weights: Flower's weighted mean ``Σ n_i Δ_i / Σ n_i``)
  against ``simulate``'s FedAvg over our masking, 3 clients holding 16, 16 and 8 examples (so a
  wrong weighting moves θ far beyond the tolerance), 2 rounds, the same tolerances. Faults (a node
  failing in each SecAgg+ stage, DP-SGD on) are in tests/test_flower_faults.py (slow).
* ``test_client_refuses_bundle_with_bad_signature``: the SDK verification path the ClientApp uses
  accepts the intact bundle and refuses a flipped signature bit, a key outside the pinned keyset and a
  changed weight byte; the ClientApp itself (called with a Flower message) replies ``accepted=False``
  with the reason and then refuses to train.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.flower_helpers import SIMULATE, flower_env

from fedproxy_secure.errors import SecurityError

ROOT = Path(__file__).resolve().parents[1]
FLOWER_PY = ROOT / ".venv" / "flower" / "bin" / "python"
ATOL = 5e-5   # max |θ_flower - θ_simulate| per coordinate
RTOL = 1e-4   # ‖θ_flower - θ_simulate‖ / ‖θ_simulate‖
ROUNDS = 2

pytestmark = pytest.mark.skipif(not FLOWER_PY.is_file(),
                                reason="the Flower overlay venv .venv/flower is missing: run `make venv`")

CONFIG = f"""
name: flower-test
seed: 0
model:
  tiny: {{arch: llama, layers: 4, hidden: 32, heads: 2, intermediate: 64, vocab: 259, max_positions: 256}}
compress: {{strategy: bi, keep_ratio: 0.5, calib_examples: 8}}
data:
  dir: {ROOT / "examples" / "data" / "bigbench-mini"}
  tasks: [sports_understanding, navigate, metaphor_boolean, strategyqa]
  calib_tasks: [winowhy]
  partition: task
  limit_train: 8
  limit_test: 4
  max_length: 256
clients: {{count: 4}}
rounds: {ROUNDS}
train: {{lr: 0.01, local_steps: 2, batch_size: 8, update_clip_norm: 1.0}}
lora: {{r: 2, alpha: 4, ffa: true}}
aggregator: {{name: sa_hties, pcr_lambda: 1.0e-5}}
secagg: {{mode: masking}}
dp: {{enabled: false}}
fusion: {{method: weight}}
"""


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> dict:
    """Operator keys, the run config and the settings both runs share."""
    from fedproxy_secure.flower.bundle_wire import init_operator

    d = tmp_path_factory.mktemp("flower")
    (d / "cfg.yaml").write_text(CONFIG)
    key, keyset = init_operator(d / "keys")
    settings = {"config": str(d / "cfg.yaml"), "keyset": str(keyset), "operator_key": str(key),
                "out": str(d / "flower-out"), "state_root": str(d / "state"), "secure": "secaggplus",
                "num_shares": 3, "reconstruction_threshold": 2, "timeout_s": 300}
    (d / "settings.json").write_text(json.dumps(settings))
    return {"dir": d, "key": key, "keyset": keyset, "settings": d / "settings.json"}


def _run_flower_and_simulate(workdir: Path, settings: Path, cfg: Path, nodes: int) -> dict:
    """Flower's simulation engine (``nodes`` nodes) and ``simulate`` on the same run config, side by side;
    both must exit 0. Returns Flower's results.json (its θ per round in ``workdir/flower-out``, simulate's in
    ``workdir/sim-out``)."""
    sim_out = workdir / "sim-out"
    sim_out.mkdir()
    flower = subprocess.Popen([str(FLOWER_PY), "-m", "fedproxy_secure.flower.simulation", "--settings", str(settings),
                               "--nodes", str(nodes), "--ray-cpus", "2"],
                              cwd=workdir, env=flower_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sim = subprocess.run([sys.executable, "-c", SIMULATE, str(cfg), str(sim_out)], cwd=workdir, env=flower_env(),
                         capture_output=True, text=True, timeout=300)
    try:
        log, _ = flower.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        flower.kill()
        raise
    assert sim.returncode == 0, sim.stderr[-3000:]
    assert flower.returncode == 0, log[-4000:]
    return json.loads((workdir / "flower-out" / "results.json").read_text())


def _assert_thetas_match(workdir: Path) -> None:
    """θ after every round: Flower equals simulate within ATOL / RTOL, and each round moved θ by far more
    than the tolerance (so the comparison can fail)."""
    theta_prev = None
    for r in range(1, ROUNDS + 1):
        tf = np.load(workdir / "flower-out" / f"theta_round{r}.npy")
        ts = np.load(workdir / "sim-out" / f"theta_round{r}.npy")
        assert tf.shape == ts.shape
        err = np.abs(tf - ts)
        assert err.max() <= ATOL, (r, float(err.max()))
        assert np.linalg.norm(tf - ts) / np.linalg.norm(ts) <= RTOL, r
        if theta_prev is not None:
            assert np.abs(ts - theta_prev).max() > 100 * ATOL
        theta_prev = ts


def test_flower_secaggplus_sa_hties_matches_simulate(fed):
    d = fed["dir"]
    res = _run_flower_and_simulate(d, fed["settings"], d / "cfg.yaml", nodes=4)
    assert res["accepted"] == 4 and all(j["accepted"] for j in res["join"]), res["join"]
    assert len(res["rounds"]) == ROUNDS
    for rec in res["rounds"]:
        assert rec["survivors"] == 4
        assert rec["aggregator"]["aggregator"] == "sa_hties"
        assert rec["aggregator"]["secure_sum"] == "flower-secaggplus"
    # stage iii ran on the server: a signed fused folder, and the fused LLM was evaluated
    assert (d / "flower-out" / "fused").is_dir() and (d / "flower-out" / "fused.keyset.json").is_file()
    assert "fused" in res["evaluation"]["methods"]
    _assert_thetas_match(d)


# FedAvg with a stateful server optimizer (FedAvgM): the momentum must evolve identically in both engines
FEDAVG_CONFIG = (CONFIG.replace("aggregator: {name: sa_hties, pcr_lambda: 1.0e-5}",
                                "aggregator: {name: fedavg, server_optimizer: {name: avgm, lr: 0.5, beta1: 0.5}}")
                 .replace("tasks: [sports_understanding, navigate, metaphor_boolean, strategyqa]",
                          "tasks: [sports_understanding, navigate, metaphor_boolean, strategyqa, presuppositions_as_nli]")
                 .replace("clients: {count: 4}", "clients: {count: 3}")
                 .replace("batch_size: 8,", "batch_size: 16,"))


def test_flower_secaggplus_fedavg_matches_simulate(fed, tmp_path):
    from fedproxy_secure.config import load_run_config
    from fedproxy_secure.pipelines.simulate import split_data

    assert FEDAVG_CONFIG.count("fedavg") == 1 and "count: 3" in FEDAVG_CONFIG and "batch_size: 16" in FEDAVG_CONFIG
    (tmp_path / "cfg.yaml").write_text(FEDAVG_CONFIG)
    # unequal weights, each client's examples in one batch (batch order cannot change an update)
    assert sorted(len(c) for c in split_data(load_run_config(tmp_path / "cfg.yaml"))[0]) == [8, 16, 16]
    settings = json.loads(fed["settings"].read_text()) | {
        "config": str(tmp_path / "cfg.yaml"), "out": str(tmp_path / "flower-out"), "state_root": str(tmp_path / "state"),
        "evaluate": False, "max_weight": 16}  # the largest client: SecAgg+ quantises (n_i / max_weight) Δ_i
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    res = _run_flower_and_simulate(tmp_path, tmp_path / "settings.json", tmp_path / "cfg.yaml", nodes=3)
    assert len(res["rounds"]) == ROUNDS
    for rec in res["rounds"]:
        assert rec["survivors"] == 3
        assert rec["aggregator"]["aggregator"] == "fedavg" and rec["aggregator"]["secure_sum"] == "flower-secaggplus"
        assert rec["server_step"]["optimizer"] == "avgm"
    _assert_thetas_match(tmp_path)


DROP_TOLERANT = """
import json
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from fedproxy_secure.flower.secaggplus import DropTolerantSecAggPlus

def fake_share_keys(self, grid, context, state):  # Flower's stage: node 5 never answered share_keys
    state.active_node_ids = {1, 2, 3, 4}
    return True

SecAggPlusWorkflow.share_keys_stage = fake_share_keys
out = {}
for threshold in (3, 5):
    st = WorkflowState()
    st.sampled_node_ids = {1, 2, 3, 4, 5}
    st.active_node_ids = {1, 2, 3, 4, 5}
    st.threshold = threshold
    st.nid_to_neighbours = {n: {1, 2, 3, 4, 5} for n in range(1, 6)}
    ok = DropTolerantSecAggPlus(num_shares=5, reconstruction_threshold=3).share_keys_stage(None, None, st)
    out[threshold] = {"ok": ok, "sampled": sorted(st.sampled_node_ids),
                      "neighbours": {str(k): sorted(v) for k, v in st.nid_to_neighbours.items()}}
print("RESULT " + json.dumps(out))
"""


def test_drop_tolerant_secaggplus_forgets_a_node_that_never_shared_its_keys():
    """The fix behind tests/test_flower_faults.py, without Ray: after share_keys the cohort and every
    neighbour set are the nodes that completed it (Flower 1.42 kept node 5 and halted in unmask), and
    the threshold check still runs on the smaller cohort (threshold 5 > the 4 nodes left fails)."""
    p = subprocess.run([str(FLOWER_PY), "-c", DROP_TOLERANT], env=flower_env(), capture_output=True, text=True, timeout=300)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, (p.stdout + p.stderr)[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["3"]["ok"] is True and out["3"]["sampled"] == [1, 2, 3, 4]
    assert out["3"]["neighbours"] == {str(n): [1, 2, 3, 4] for n in (1, 2, 3, 4)}  # node 5 gone everywhere
    assert out["5"]["ok"] is False  # each node has 4 active neighbours (itself included) left, 5 needed


CLIENT_APP_REFUSES = """
import json, sys, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.metadata import Metadata
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
import numpy as np
from fedproxy_secure.flower.bundle_wire import bundle_blobs
from fedproxy_secure.flower.client_app import JOIN, make_client_app
from fedproxy_secure.flower.settings import FlowerSettings

settings = FlowerSettings.model_validate(json.loads(open(sys.argv[1]).read()))
blobs = bundle_blobs(sys.argv[2])
blobs["MANIFEST.sig"] = bytes([blobs["MANIFEST.sig"][0] ^ 1]) + blobs["MANIFEST.sig"][1:]
app = make_client_app(settings)
ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
              run_config={})
def md(kind, mid):
    return Metadata(run_id=1, message_id=mid, src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="g",
                    created_at=time.time(), ttl=3600.0, message_type=kind)
rep = app(Message(metadata=md(MessageType.QUERY, "m1"), content=RecordDict({JOIN: ConfigRecord(blobs)})), ctx)
out = {"join": dict(rep.content.config_records[JOIN])}
fit = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(3)]), {"phase": "train"}), keep_input=True)
try:
    app(Message(metadata=md(MessageType.TRAIN, "m2"), content=fit), ctx)
    out["train"] = "trained"
except Exception as exc:
    out["train"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
"""


def test_client_refuses_bundle_with_bad_signature(fed, tmp_path):
    import torch

    from fedproxy_secure.artifacts.keys import generate_key, save_operator_key
    from fedproxy_secure.config import load_run_config
    from fedproxy_secure.flower.bundle_wire import bundle_blobs, issue_proxy_bundle, receive_bundle
    from fedproxy_secure.models import build_tiny_model, byte_tokenizer
    from fedproxy_secure.compress import CompressedProxy

    torch.manual_seed(0)
    cfg = load_run_config(fed["dir"] / "cfg.yaml")
    proxy = CompressedProxy(build_tiny_model(cfg.model.tiny), {"layer_map": [0, 1, 2, 3], "base_model_hash": "h0"})
    bundle = issue_proxy_bundle(proxy, byte_tokenizer(), "h0", fed["key"], tmp_path / "issued", version=1, valid_days=3)
    blobs = bundle_blobs(bundle)

    # control: the intact bundle verifies and loads, so each refusal below is caused by its tamper
    model, tok, vb = receive_bundle(blobs, fed["keyset"], tmp_path / "ok")
    assert vb.bundle_id and model is not None and tok is not None

    bad_sig = dict(blobs, **{"MANIFEST.sig": bytes([blobs["MANIFEST.sig"][0] ^ 1]) + blobs["MANIFEST.sig"][1:]})
    with pytest.raises(SecurityError, match="does not verify under any key of the pinned keyset"):
        receive_bundle(bad_sig, fed["keyset"], tmp_path / "bad-sig")
    assert not (tmp_path / "bad-sig" / "bundle").exists()  # nothing of a refused bundle is kept

    other = generate_key()  # a well-formed signature by a key the site never pinned
    save_operator_key(other, tmp_path / "other.key")
    foreign = bundle_blobs(issue_proxy_bundle(proxy, byte_tokenizer(), "h0", tmp_path / "other.key", tmp_path / "i2",
                                              version=1, valid_days=3))
    with pytest.raises(SecurityError, match="pinned keyset"):
        receive_bundle(foreign, fed["keyset"], tmp_path / "foreign")

    weights = next(k for k in blobs if k.endswith(".safetensors"))
    body = bytearray(blobs[weights])
    body[-1] ^= 1
    with pytest.raises(SecurityError):
        receive_bundle(dict(blobs, **{weights: bytes(body)}), fed["keyset"], tmp_path / "bad-file")

    # the ClientApp itself, called with a Flower message: refuses at join, then refuses to train
    p = subprocess.run([str(FLOWER_PY), "-c", CLIENT_APP_REFUSES, str(fed["settings"]), str(bundle)],
                       cwd=tmp_path, env=flower_env(), capture_output=True, text=True, timeout=300)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, (p.stdout + p.stderr)[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["join"]["accepted"] is False
    assert "does not verify under any key of the pinned keyset" in out["join"]["reason"]
    assert out["train"].startswith("SecurityError") and "no verified proxy bundle" in out["train"], out["train"]


def test_deployment_client_never_takes_its_keyset_or_dp_config_from_the_run_config(fed):
    from fedproxy_secure.flower.settings import FlowerSettings, client_config_path, client_keyset_path

    s = FlowerSettings.model_validate(json.loads(fed["settings"].read_text()))
    assert client_keyset_path({"partition-id": 0}, s) == Path(s.keyset)  # simulation runtime
    assert client_config_path({"partition-id": 0}, s) == Path(s.config)
    assert client_keyset_path({"keyset": "/site/keyset.json"}, s) == Path("/site/keyset.json")
    assert client_config_path({"fedproxy-config": "/site/fedproxy.yaml"}, s) == Path("/site/fedproxy.yaml")
    with pytest.raises(SecurityError, match="no pinned keyset"):
        client_keyset_path({"data-file": "/site/train.jsonl"}, s)  # a SuperNode without its own keyset
    with pytest.raises(SecurityError, match="no FedProxy config of its own"):
        client_config_path({"keyset": "/site/keyset.json"}, s)  # ... or without its own YAML (DP budget)


def test_settings_round_trip_and_refuse_unknown_keys(fed):
    from fedproxy_secure.errors import ConfigError
    from fedproxy_secure.flower.settings import FlowerSettings

    s = FlowerSettings.model_validate(json.loads(fed["settings"].read_text()))
    assert FlowerSettings.from_run_config(s.to_run_config()) == s
    assert s.shares_arg() == 3 and s.threshold_arg() == 2
    with pytest.raises(ConfigError, match="unknown key"):
        FlowerSettings.from_run_config({"fedproxy-config": "x.yaml", "secagg": "on"})
    with pytest.raises(ConfigError):
        FlowerSettings.from_run_config({"fedproxy-config": "x.yaml", "secure": "plaintext-please"})


def test_import_contract_keeps_the_sdk_free_of_flower(tmp_path):
    """pyproject's contract 'the SDK never imports the Flower app or flwr' breaks when an SDK module
    imports fedproxy_secure.flower (the extra stays optional: the SDK runs without flwr)."""
    shutil.copytree(ROOT / "fedproxy_secure", tmp_path / "fedproxy_secure",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    mod = tmp_path / "fedproxy_secure" / "aggregate" / "fedavg.py"
    mod.write_text(mod.read_text() + "\nimport fedproxy_secure.flower.settings  # deliberately bad\n")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), str(tmp_path / "pyproject.toml"), "--no-cache"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert "the SDK never imports the Flower app or flwr" in r.stdout and "BROKEN" in r.stdout, r.stdout[-2000:]
    assert "fedproxy_secure.aggregate.fedavg -> fedproxy_secure.flower.settings" in r.stdout
