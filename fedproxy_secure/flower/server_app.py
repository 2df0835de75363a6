"""The FedProxy ServerApp: compress, issue the signed bundle, run rounds, aggregate with the SDK, fuse.

One run (:func:`run_fedproxy`), in protocol order:

1. stage i with the SDK (:func:`fedproxy_secure.pipelines.simulate.prepare`): load the LLM, compress
   it into the proxy; sign the proxy as a bundle with the operator key
   (:func:`fedproxy_secure.flower.bundle_wire.issue_proxy_bundle`);
2. ``fedproxy.join``: every node gets the bundle and verifies it (``client join``'s checks); a node
   that refuses is left out of every round and named in ``results.json``;
3. per round, the global LoRA vector ``θ`` (and the previous conflict vector ``C`` for PCR) goes
   out in Flower's legacy FitIns layout; clients train with the SDK trainer;

   * ``secure = "secaggplus"``: FedAvg is one SecAgg+ run (Flower's weighted mean with the
     client's example count as weight = ``Σ n_i Δ_i / Σ n_i``); SA-H-TIES is two SecAgg+ runs
     (phase A and phase B vectors, unit weights, so sum = mean × survivors), with the scalar
     ``h_i`` revealed in between when ``h_norm = "reveal"``, then the SDK's
     :func:`~fedproxy_secure.aggregate.sa_hties.sa_server_finish`. The plaintext rules (H-TIES,
     TIES) need every update in the clear and are refused here;
   * ``secure = "none"``: the server receives each clipped update and runs the SDK aggregator the
     run config names (``simulate``'s choice of aggregator), ordered by partition id;

   then the global step with the server optimizer on ``c · Δ*``, the same
   :class:`~fedproxy_secure.pipelines.round_driver.GlobalStepper` as ``simulate``;
4. stage iii on the server: the SDK writes the proxy + global adapter, fuses them into the LLM
   (signed fused folder, loaded back through the verifying loader) and evaluates the fused LLM.

Outputs under ``out``: ``theta_round{r}.npy`` (θ after round r), ``results.json`` and, when
``evaluate`` is on, ``proxy/``, ``global_adapter/``, ``fused/`` and ``predictions.jsonl``.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

from fedproxy_secure.errors import ConfigError, FedProxyError
from fedproxy_secure.flower.client_app import JOIN, REVEAL, REVEAL_SUM
from fedproxy_secure.flower.secaggplus import DropTolerantSecAggPlus
from fedproxy_secure.flower.settings import FlowerSettings, lora_fingerprint

log = logging.getLogger("fedproxy.flower")
SECURE_AGGREGATORS = ("fedavg", "sa_hties")


class _CaptureStrategy(Strategy):
    """A legacy Strategy that lets Flower's SecAgg+ workflow run one secure sum for FedProxy.

    ``configure_fit`` sends the same FitIns to every given node; ``aggregate_fit`` keeps the
    unmasked weighted mean SecAgg+ computed (each FitRes carries the aggregate, never an
    individual update) and the clients' plain metrics.
    """

    def __init__(self, node_ids: list[int], fitins: FitIns) -> None:
        self.node_ids, self.fitins = node_ids, fitins
        self.mean: list[np.ndarray] | None = None
        self.survivors = 0
        self.metrics: list[dict] = []
        self.failures = 0

    def initialize_parameters(self, client_manager):  # noqa: D102
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        clients = client_manager.all()
        return [(clients[str(nid)], self.fitins) for nid in self.node_ids if str(nid) in clients]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        self.failures = len(failures)
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.survivors = len(results)
        self.metrics = [dict(r.metrics) for _, r in results]
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


class _Round:
    """Sends one round's work through the Grid, plain or under SecAgg+."""

    def __init__(self, grid: Grid, context: Context, settings: FlowerSettings, node_ids: list[int]) -> None:
        self.grid, self.context, self.settings, self.node_ids = grid, context, settings, node_ids
        self.calls = 0
        self.cm = SimpleClientManager()
        for nid in node_ids:
            self.cm.register(GridClientProxy(nid, grid, context.run_id))

    def secagg_mean(self, arrays: list[np.ndarray], fc: dict, max_weight: float) -> _CaptureStrategy:
        """One SecAgg+ run over ``node_ids``: the weighted mean of the clients' replies (weights = their
        FitRes example counts). Raises FedProxyError when SecAgg+ halts (too few survivors)."""
        self.calls += 1
        strategy = _CaptureStrategy(self.node_ids, FitIns(ndarrays_to_parameters(arrays), fc))
        lctx = LegacyContext(self.context, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=self.cm)
        lctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: self.calls})
        lctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(arrays), keep_input=True)
        s = self.settings
        wf = DropTolerantSecAggPlus(num_shares=s.shares_arg(), reconstruction_threshold=s.threshold_arg(),
                                    max_weight=max_weight, clipping_range=s.clipping_range,
                                    quantization_range=s.quantization_range, timeout=s.timeout_s)
        wf(self.grid, lctx)
        if strategy.mean is None:
            raise FedProxyError(f"SecAgg+ halted in phase {fc.get('phase')!r} (too few surviving nodes or shares); "
                                "round abandoned, theta unchanged")
        return strategy

    def plain(self, arrays: list[np.ndarray], fc: dict) -> list[tuple[int, np.ndarray, int, dict]]:
        """Plain ``train`` messages; replies as ``(partition, update, examples, metrics)``, failures dropped."""
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), fc), keep_input=True)
        msgs = [Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(fc["round_id"]))
                for nid in self.node_ids]
        out = []
        for rep in self.grid.send_and_receive(msgs, timeout=self.settings.timeout_s):
            if rep.has_error():
                log.warning("node %s failed its round: %s", rep.metadata.src_node_id, rep.error.reason)
                continue
            fr = compat.recorddict_to_fitres(rep.content, keep_input=False)
            m = dict(fr.metrics)
            out.append((int(m.get("partition", rep.metadata.src_node_id)), parameters_to_ndarrays(fr.parameters)[0],
                        int(fr.num_examples), m))
        return sorted(out, key=lambda t: t[0])

    def query(self, key: str, records: dict[int, RecordDict] | RecordDict) -> list[Message]:
        msgs = []
        for nid in self.node_ids:
            content = records[nid] if isinstance(records, dict) else records
            msgs.append(Message(content, dst_node_id=nid, message_type=MessageType.QUERY, group_id=key))
        return list(self.grid.send_and_receive(msgs, timeout=self.settings.timeout_s))


def _wait_for_nodes(grid: Grid, n: int, timeout_s: float = 120.0) -> list[int]:
    t0 = time.time()
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n or time.time() - t0 > timeout_s:
            return ids
        time.sleep(0.5)


def join(rnd: _Round, blobs: dict[str, bytes]) -> tuple[list[int], list[dict]]:
    """Send the bundle; return the node ids that accepted it and one record per node."""
    replies = rnd.query(JOIN, RecordDict({JOIN: ConfigRecord(blobs)}))
    accepted, records = [], []
    for rep in replies:
        nid = rep.metadata.src_node_id
        if rep.has_error():
            records.append({"node": nid, "accepted": False, "reason": rep.error.reason})
            continue
        r = dict(rep.content.config_records[JOIN])
        records.append({"node": nid, **r})
        if r.get("accepted"):
            accepted.append(nid)
        else:
            log.warning("node %s refused the proxy bundle: %s", nid, r.get("reason"))
    return sorted(accepted), sorted(records, key=lambda r: r["node"])


def _round_config(cfg, r: int, a_seed: int, has_conflict: bool, secure: str) -> dict[str, Any]:
    """The per-round instructions (scalars only): exactly the fields ``simulate`` puts in ClientRoundSpec."""
    from fedproxy_secure.pipelines.round_driver import client_round_fields

    return {"round_id": r, "a_seed": a_seed, "has_conflict": has_conflict, **client_round_fields(cfg, r),
            "secure": secure, "lora_hash": lora_fingerprint(cfg)}


def _aggregate_secure(rnd: _Round, cfg, settings: FlowerSettings, arrays: list[np.ndarray], fc: dict, record: dict):
    """One round's aggregate under SecAgg+ (module docstring, step 3); returns the SDK's AggResult."""
    from fedproxy_secure.aggregate import AggResult
    from fedproxy_secure.aggregate.hties import HTiesParams
    from fedproxy_secure.aggregate.sa_hties import PHASE_A_PARTS, PHASE_B_PARTS, sa_h_range, sa_server_finish, unpack

    name = cfg.aggregator.name
    if name == "fedavg":
        st = rnd.secagg_mean(arrays, fc | {"phase": "train"}, settings.max_weight)
        record.update(survivors=st.survivors, clients=st.metrics)
        delta = np.asarray(st.mean[0], dtype=np.float64)
        return AggResult(delta=delta, conflict=None, info={"aggregator": "fedavg", "num_clients": st.survivors,
                                                            "secure_sum": "flower-secaggplus"})
    a = cfg.aggregator
    prm = HTiesParams(r0=a.r0, delta=a.delta, rho=a.rho)
    st_a = rnd.secagg_mean(arrays, fc | {"phase": "sa_a"}, 1.0)
    k = st_a.survivors
    sums_a = unpack(np.asarray(st_a.mean[0], dtype=np.float64) * k, PHASE_A_PARTS)
    extra: dict[str, Any] = {"phase": "sa_b", "num_clients": k}
    if prm.h_norm == "reveal":
        rec = RecordDict({REVEAL: ConfigRecord({"num_clients": k}), })
        rec.array_records[REVEAL_SUM] = ArrayRecord([sums_a[0]])
        reps = []
        for m in rnd.query(REVEAL, rec):
            if m.has_error():
                log.warning("node %s failed the h reveal: %s", m.metadata.src_node_id, m.error.reason)
            else:
                reps.append(m)
        lo, hi = sa_h_range([float(m.content.config_records[REVEAL]["h"]) for m in reps], k)
        extra.update(h_min=lo, h_max=hi)
    st_b = rnd.secagg_mean([sums_a[0]], fc | extra, 1.0)
    if st_b.survivors != k:
        raise FedProxyError(f"SA-H-TIES: {k} nodes in phase A but {st_b.survivors} in phase B; round abandoned")
    sums_b = unpack(np.asarray(st_b.mean[0], dtype=np.float64) * k, PHASE_B_PARTS)
    record.update(survivors=k, clients=st_a.metrics)
    res = sa_server_finish(sums_a, sums_b, k, prm)
    res.info["secure_sum"] = "flower-secaggplus"
    return res


def run_fedproxy(grid: Grid, context: Context, settings: FlowerSettings, say: Callable[[str], None] = print) -> dict:
    """Run one FedProxy federation on Flower (module docstring); returns and writes ``results.json``."""
    from fedproxy_secure.aggregate import AggState, plain_sum
    from fedproxy_secure.config import load_run_config
    from fedproxy_secure.flower.bundle_wire import bundle_blobs, issue_proxy_bundle
    from fedproxy_secure.lora import attach_lora, get_lora_vector, set_lora_vector
    from fedproxy_secure.pipelines.round_driver import GlobalStepper, federation_a_seed, run_aggregator
    from fedproxy_secure.pipelines.simulate import json_default, prepare

    import torch

    torch.set_num_threads(settings.torch_threads)
    t_start = time.time()
    cfg = load_run_config(settings.config)
    if settings.operator_key is None:
        raise ConfigError("Flower run config: operator-key is required (the key that signs the proxy bundle)")
    if settings.secure == "secaggplus" and cfg.aggregator.name not in SECURE_AGGREGATORS:
        raise ConfigError(f"aggregator.name = {cfg.aggregator.name!r} needs every client's update in the clear; under "
                          f"secure = 'secaggplus' use one of {SECURE_AGGREGATORS}, or secure = 'none'")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg, say, bars=False)
    work = Path(tempfile.mkdtemp(prefix="fedproxy-flower-"))
    bundle_dir = issue_proxy_bundle(prep.proxy, prep.tokenizer, prep.llm_hash, settings.operator_key, work,
                                    version=settings.bundle_version, valid_days=settings.bundle_valid_days)
    blobs = bundle_blobs(bundle_dir)
    ids = _wait_for_nodes(grid, max(settings.min_clients, 2))
    rnd = _Round(grid, context, settings, ids)
    t0 = time.time()
    accepted, join_records = join(rnd, blobs)
    join_seconds = round(time.time() - t0, 2)
    say(f"join: {len(accepted)}/{len(ids)} nodes verified the bundle ({sum(len(b) for b in blobs.values())} bytes) "
        f"in {time.time() - t0:.1f}s")
    if len(accepted) < settings.min_clients:
        raise FedProxyError(f"only {len(accepted)} nodes accepted the signed proxy bundle; min-clients is "
                            f"{settings.min_clients}")
    rnd = _Round(grid, context, settings, accepted)
    a_seed = federation_a_seed(cfg.seed)
    model = attach_lora(copy.deepcopy(prep.proxy.model), cfg.lora, a_seed)
    theta = get_lora_vector(model)
    state = AggState(round=0, conflict=None)
    clip = cfg.train.update_clip_norm
    stepper = GlobalStepper(cfg)
    rounds = []
    for r in range(cfg.rounds):
        t0 = time.time()
        record: dict[str, Any] = {"round": r + 1}
        fc = _round_config(cfg, r, a_seed, state.conflict is not None, settings.secure)
        arrays = [theta, state.conflict if state.conflict is not None else np.zeros(0)]
        if settings.secure == "secaggplus":
            res = _aggregate_secure(rnd, cfg, settings, arrays, fc, record)
        else:
            replies = rnd.plain(arrays, fc | {"phase": "train"})
            if not replies:
                raise FedProxyError(f"round {r + 1}: no node returned an update")
            record.update(survivors=len(replies), clients=[m for *_, m in replies])
            agg = run_aggregator(cfg, plain_sum)
            res = agg.aggregate([u for _, u, _, _ in replies], [n for _, _, n, _ in replies], state)
        theta, record["server_step"] = stepper.step(theta, clip * res.delta, r)
        state = AggState(round=r + 1, conflict=res.conflict)
        np.save(out / f"theta_round{r + 1}.npy", theta, allow_pickle=False)
        losses = [c["train_loss"] for c in record.get("clients", []) if "train_loss" in c]
        record.update(aggregator={k: v for k, v in res.info.items() if k != "client_side_simulated"},
                      train_loss=float(np.mean(losses)) if losses else None, global_norm=float(np.linalg.norm(theta)),
                      seconds=round(time.time() - t0, 3))
        rounds.append(record)
        say(f"round {r + 1}/{cfg.rounds}: {record['survivors']} nodes, |theta| {record['global_norm']:.4f}, "
            f"{record['seconds']:.1f}s")
    set_lora_vector(model, theta)
    results: dict[str, Any] = {
        "name": cfg.name, "runtime": "flower", "secure": settings.secure, "aggregator": cfg.aggregator.name,
        "nodes": len(ids), "accepted": len(accepted), "join_seconds": join_seconds, "join": join_records,
        "rounds": rounds,
        "bundle": {"bundle_id": json.loads((bundle_dir / "MANIFEST.json").read_bytes())["bundle_id"],
                   "bytes": sum(len(b) for b in blobs.values())},
    }
    if settings.evaluate:
        results["evaluation"] = _fuse_and_evaluate(cfg, prep, model, out, say)
    results["seconds"] = round(time.time() - t_start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=json_default))
    return results


def _fuse_and_evaluate(cfg, prep, peft_proxy, out: Path, say: Callable[[str], None]) -> dict:
    """Stage iii on the server with the SDK: proxy + adapter folders, signed fused LLM, evaluation."""
    from fedproxy_secure.compress.proxy_io import save_proxy
    from fedproxy_secure.eval import model_logits_fn
    from fedproxy_secure.pipelines.demo_eval import Evaluation, fused_logits_fn, train_by_task, write_and_load_fused
    from fedproxy_secure.pipelines.simulate import llm_folder
    from fedproxy_secure.server.export import save_adapter_on_proxy

    import shutil

    for d in ("proxy", "global_adapter", "fused"):
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "fused.keyset.json").unlink(missing_ok=True)
    proxy_dir, adapter_dir = out / "proxy", out / "global_adapter"
    save_proxy(prep.proxy, prep.tokenizer, proxy_dir, base_model_hash=prep.llm_hash)
    save_adapter_on_proxy(peft_proxy, adapter_dir, proxy_dir)
    with tempfile.TemporaryDirectory(prefix="fedproxy-flower-llm-") as w:
        llm_dir = llm_folder(cfg, prep, Path(w))
        fused, meta, _ = write_and_load_fused(llm_dir, proxy_dir, adapter_dir, out / "fused", method=cfg.fusion.method,
                                              beta=cfg.fusion.logit_beta, scale=cfg.fusion.scale,
                                              source_round=cfg.rounds, aggregator=cfg.aggregator.name)
    ev = Evaluation(prep.tokenizer, prep.test_sets, train_by_task(prep.client_data), batch_size=16,
                    max_length=cfg.data.max_length, device=cfg.train.device, seed=cfg.seed)
    ev.score("zs_llm", model_logits_fn(prep.llm))
    ev.score("fused", fused_logits_fn(fused))
    ev.add_baselines()
    ev.write_predictions(out / "predictions.jsonl")
    summary = ev.summary()
    heads = {m: summary["methods"][m].get("headline") for m in ("zs_llm", "fused") if m in summary["methods"]}
    say("fused LLM evaluated (macro balanced accuracy): " + ", ".join(f"{m} {v:.3f}" for m, v in heads.items()
                                                                    if isinstance(v, (int, float))))
    return summary


def make_server_app(settings: FlowerSettings | None = None) -> ServerApp:
    """A ServerApp running :func:`run_fedproxy`; ``settings`` None = read Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings if settings is not None else FlowerSettings.from_run_config(dict(context.run_config))
        run_fedproxy(grid, context, s)

    return app


#: the ServerApp ``flwr run`` loads (``[tool.flwr.app.components] serverapp``)
app = make_server_app()
