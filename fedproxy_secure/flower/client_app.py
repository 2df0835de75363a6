"""The FedProxy ClientApp: verify the signed proxy bundle, then train with the SDK's client trainer.

Messages it handles (content layouts in :mod:`fedproxy_secure.flower.server_app`):

* ``query`` ``fedproxy.join``: the signed bundle as bytes. Verified by
  :func:`fedproxy_secure.flower.bundle_wire.receive_bundle` against the site's pinned keyset
  (``client join``'s checks). The reply says ``accepted`` or carries the refusal reason; a refused
  node never trains.
* ``train`` (Flower's legacy FitIns layout, so Flower's ``secaggplus_mod`` can mask the reply):
  phase ``train`` returns the clipped update ``Δ/c`` with weight = example count (FedAvg and the
  plaintext rules); phase ``sa_a`` trains, keeps ``Δ/c`` in the node's state and returns the
  SA-H-TIES phase-A vector; phase ``sa_b`` returns the phase-B vector from the broadcast sum.
* ``query`` ``fedproxy.sa_reveal``: SA-H-TIES ``h_norm="reveal"``: the scalar ``h_i`` in the clear,
  at most once per phase-A update (a second query, for any T, is refused) and only for a T that is
  this node's phase-A vector plus K − 1 unit vectors (``‖T − x̂‖ ≤ K − 1``); phase ``sa_b`` must then
  carry the same T and K it revealed h for.

Training is :func:`fedproxy_secure.client.trainer.train_round` (FFA-LoRA with the run's A seed,
PCR with the broadcast conflict vector, DP-SGD charged to the node's on-disk privacy budget before
any example is touched). The ``secaggplus_mod`` is always installed: under SecAgg+ the reply leaves
the node only masked; in ``secure = "none"`` runs the server sends plain ``train`` messages and the
mod passes them through.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedproxy_secure.errors import ConfigError, FedProxyError, SecurityError
from fedproxy_secure.flower.settings import FlowerSettings, client_config_path, client_keyset_path, lora_fingerprint

JOIN = "fedproxy.join"
REVEAL = "fedproxy.sa_reveal"
REVEAL_SUM = "fedproxy.sa_reveal.sum"
STATE_DELTA = "fedproxy.delta"
#: the T (SHA-256) and K this node revealed h for, this round (one reveal per phase-A update)
STATE_REVEAL = "fedproxy.sa_reveal.done"


def _coord_error(settings: FlowerSettings) -> float:
    """Flower's SecAgg+ quantisation error per coordinate and node (stochastic rounding onto
    ``quantization_range`` levels over ``[-clipping_range, clipping_range]``), with a factor 2 of margin."""
    return 4.0 * float(settings.clipping_range) / float(settings.quantization_range)
STATE_BUNDLE = "fedproxy.bundle"


@dataclass
class _Node:
    """What one node keeps in this process: its verified proxy (with LoRA once attached) and data."""

    model: Any
    tokenizer: Any
    bundle_id: str
    examples: list
    budget: Any
    a_seed: int | None = None


_NODES: dict[tuple[int, int], _Node] = {}
_LOCK = threading.Lock()


def _settings(context: Context, bound: FlowerSettings | None = None) -> FlowerSettings:
    return bound if bound is not None else FlowerSettings.from_run_config(dict(context.run_config))


def _state_dir(context: Context, settings: FlowerSettings) -> Path:
    """The node's private state folder: ``--node-config state-dir=...``, else under ``state-root``/tmp."""
    if context.node_config.get("state-dir"):
        return Path(str(context.node_config["state-dir"]))
    root = settings.state_root or Path(tempfile.gettempdir()) / "fedproxy-flower"
    return root / f"run{context.run_id}" / f"node{context.node_id}"


_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, build):
    """Per-process cache for what every virtual node of one run shares (the run config, the data split)."""
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = build()
    with _LOCK:
        _CACHE[key] = value
    return value


def _examples(context: Context, cfg, settings: FlowerSettings) -> list:
    """This node's training examples: ``--node-config data-file=...`` (JSONL), else in the simulation
    runtime the SDK's split of the run config's data for ``partition-id`` (what ``simulate`` gives client k)."""
    nc = context.node_config
    if nc.get("data-file"):
        from fedproxy_secure.client.local import load_examples

        return load_examples(str(nc["data-file"]))
    if "partition-id" not in nc:
        raise ConfigError("this SuperNode has no data: start it with --node-config 'data-file=\"/path/train.jsonl\"'")
    from fedproxy_secure.pipelines.simulate import split_data

    pid = int(nc["partition-id"])
    path = client_config_path(nc, settings)
    client_data = _cached(("split", str(path), path.stat().st_mtime), lambda: split_data(cfg)[0])
    if settings.reuse_partitions:
        pid %= len(client_data)
    if not 0 <= pid < len(client_data):
        raise ConfigError(f"partition-id {pid} is outside the run config's {len(client_data)} clients (clients.count)")
    return client_data[pid]


def _run_cfg(context: Context, settings: FlowerSettings):
    """This node's FedProxy run config (see :func:`client_config_path` for whose file it is)."""
    from fedproxy_secure.config import load_run_config

    path = client_config_path(context.node_config, settings)
    return _cached(("cfg", str(path), path.stat().st_mtime), lambda: load_run_config(path))


def _node(context: Context, settings: FlowerSettings) -> _Node:
    """This node's loaded proxy; re-verifies the kept bundle when this process has not loaded it yet."""
    key = (context.run_id, context.node_id)
    with _LOCK:
        node = _NODES.get(key)
    if node is not None:
        return node
    if STATE_BUNDLE not in context.state.config_records:
        raise SecurityError("no verified proxy bundle on this node: the server must send fedproxy.join first")
    from fedproxy_secure.flower.bundle_wire import reload_bundle

    model, tok, vb = reload_bundle(client_keyset_path(context.node_config, settings), _state_dir(context, settings))
    if vb.bundle_id != context.state.config_records[STATE_BUNDLE]["bundle_id"]:
        raise SecurityError("the kept proxy bundle is not the one this node accepted at join; refused")
    return _remember(context, settings, model, tok, vb.bundle_id)


def _remember(context: Context, settings: FlowerSettings, model, tok, bundle_id: str) -> _Node:
    import torch

    torch.set_num_threads(settings.torch_threads)
    cfg = _run_cfg(context, settings)
    budget = None
    if cfg.dp.enabled:
        from fedproxy_secure.privacy import PrivacyBudget

        budget = PrivacyBudget(_state_dir(context, settings) / "privacy_budget.json", cfg.dp.epsilon, cfg.dp.delta)
    node = _Node(model, tok, bundle_id, _examples(context, cfg, settings), budget)
    with _LOCK:
        _NODES[(context.run_id, context.node_id)] = node
    return node


def handle_join(msg: Message, context: Context, bound: FlowerSettings | None = None) -> Message:
    """Verify the bundle in a ``fedproxy.join`` query; reply ``accepted`` (with the bundle id) or the refusal.

    Guarantee: the reply is ``accepted = True`` only when every check of ``client join`` passed.
    """
    settings = _settings(context, bound)
    blobs = {k: v for k, v in msg.content.config_records[JOIN].items() if isinstance(v, bytes)}
    reply: dict[str, Any] = {"accepted": False, "reason": "", "bundle_id": "", "bundle_version": -1,
                             "partition": int(context.node_config.get("partition-id", -1))}
    try:
        from fedproxy_secure.flower.bundle_wire import receive_bundle

        model, tok, vb = receive_bundle(blobs, client_keyset_path(context.node_config, settings),
                                        _state_dir(context, settings))
        _remember(context, settings, model, tok, vb.bundle_id)
        context.state.config_records[STATE_BUNDLE] = ConfigRecord({"bundle_id": vb.bundle_id, "version": vb.version})
        reply.update(accepted=True, bundle_id=vb.bundle_id, bundle_version=vb.version)
    except (SecurityError, ConfigError) as exc:
        with _LOCK:
            _NODES.pop((context.run_id, context.node_id), None)
        context.state.config_records.pop(STATE_BUNDLE, None)
        reply["reason"] = f"{type(exc).__name__}: {exc}"
    return Message(RecordDict({JOIN: ConfigRecord(reply)}), reply_to=msg)


def _spec(cfg, fc: dict, arrays: list[np.ndarray]):
    from fedproxy_secure.client.trainer import ClientRoundSpec

    has_conflict = bool(fc["has_conflict"])
    return ClientRoundSpec(
        round_id=int(fc["round_id"]), a_seed=int(fc["a_seed"]), theta_global=np.asarray(arrays[0], dtype=np.float64),
        conflict=np.asarray(arrays[1], dtype=np.float64) if has_conflict else None,
        pcr_lambda=float(fc["pcr_lambda"]), lr=float(fc["lr"]), local_steps=int(fc["local_steps"]),
        batch_size=int(fc["batch_size"]), max_length=int(fc["max_length"]), clip_norm=float(fc["clip_norm"]),
        dp=cfg.dp if cfg.dp.enabled else None, planned_rounds=int(fc["planned_rounds"]),
        fedprox_mu=float(fc["fedprox_mu"]),
    )


def _train(node: _Node, cfg, settings: FlowerSettings, fc: dict, arrays: list[np.ndarray]) -> tuple[np.ndarray, int, dict]:
    """Local round with the SDK trainer; returns ``(Δ/c, examples, metrics)``."""
    from fedproxy_secure.client.trainer import train_round
    from fedproxy_secure.lora import attach_lora

    a_seed = int(fc["a_seed"])
    if node.a_seed is None:
        if fc.get("lora_hash") != lora_fingerprint(cfg):
            raise ConfigError("the server's LoRA settings differ from this node's run config; refusing to train")
        node.model = attach_lora(node.model, cfg.lora, a_seed)
        node.a_seed = a_seed
    elif node.a_seed != a_seed:
        raise SecurityError(f"round config changed the LoRA A seed ({node.a_seed} -> {a_seed}); FFA-LoRA keeps A fixed")
    spec = _spec(cfg, fc, arrays)
    upd = train_round(node.model, node.tokenizer, node.examples, spec, budget=node.budget, device=cfg.train.device)
    metrics = {k: v for k, v in upd.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return upd.delta / spec.clip_norm, int(upd.num_examples), metrics


def handle_train(msg: Message, context: Context, bound: FlowerSettings | None = None) -> Message:
    """One ``train`` message (FitIns layout in, FitRes layout out); see the module docstring for phases.

    Guarantees: trains only on a node whose bundle verified at join; a FedAvg weight above the
    SecAgg+ ``max_weight`` is refused (Flower would silently clip it); every returned value lies in
    ``[-1, 1]`` (the SDK clips ``Δ`` to L2 norm ``c``).
    """
    from fedproxy_secure.aggregate.sa_hties import pack, sa_phase_a_client, sa_phase_b_client
    from fedproxy_secure.aggregate.hties import HTiesParams

    settings = _settings(context, bound)
    cfg = _run_cfg(context, settings)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    fc = dict(fitins.config)
    arrays = parameters_to_ndarrays(fitins.parameters)
    phase = str(fc["phase"])
    node = _node(context, settings)
    metrics: dict = {"partition": int(context.node_config.get("partition-id", -1))}
    if phase in ("train", "sa_a"):
        x, n, m = _train(node, cfg, settings, fc, arrays)
        metrics.update(m)
        if phase == "train":
            if fc.get("secure") == "secaggplus" and n > settings.max_weight:
                raise ConfigError(f"{n} training examples exceed the SecAgg+ max-weight {settings.max_weight}; "
                                  "raise max-weight in the run config")
            out, weight = [x], n
        else:
            from flwr.app import ArrayRecord

            context.state.array_records[STATE_DELTA] = ArrayRecord([x])  # for phase B of this round only
            context.state.config_records.pop(STATE_REVEAL, None)  # a fresh phase-A update: h not revealed yet
            out, weight = [pack(sa_phase_a_client(x))], 1
    elif phase == "sa_b":
        x = _kept_delta(context)
        a = cfg.aggregator
        prm = HTiesParams(r0=a.r0, delta=a.delta, rho=a.rho)
        h_range = (float(fc["h_min"]), float(fc["h_max"])) if "h_min" in fc else None
        _check_round_t(context, x, arrays[0], int(fc["num_clients"]), revealed=h_range is not None,
                       coord_error=_coord_error(settings))
        b = sa_phase_b_client(x, arrays[0], None, prm, num_clients=int(fc["num_clients"]), h_range=h_range)
        del context.state.array_records[STATE_DELTA]
        context.state.config_records.pop(STATE_REVEAL, None)
        out, weight = [pack(b.vectors)], 1
    else:
        raise ConfigError(f"unknown FedProxy phase {phase!r}")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.asarray(v, dtype=np.float64) for v in out]),
                 weight, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _t_sha256(t: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(t, dtype="<f8").tobytes()).hexdigest()


def _check_round_t(context: Context, x: np.ndarray, t: np.ndarray, k: int, *, revealed: bool,
                   coord_error: float) -> None:
    """Phase B: T within its bound for this node's x̂, and (reveal mode) the very T and K h was revealed for."""
    import hmac

    from fedproxy_secure.aggregate.sa_hties import sa_phase_a_client
    from fedproxy_secure.errors import ProtocolAbort
    from fedproxy_secure.protocol.sa_hties_wire import check_t_values

    try:
        check_t_values(t, k, own=sa_phase_a_client(x)[0], coord_error=coord_error)
    except ProtocolAbort as exc:
        raise SecurityError(f"SA-H-TIES phase B: {exc}") from None
    if revealed:
        rec = context.state.config_records.get(STATE_REVEAL)
        if rec is None or int(rec["k"]) != k or not hmac.compare_digest(str(rec["t_sha256"]), _t_sha256(t)):
            raise SecurityError("SA-H-TIES phase B: T or K differ from those this node revealed h for; refused")


def _kept_delta(context: Context) -> np.ndarray:
    if STATE_DELTA not in context.state.array_records:
        raise FedProxyError("SA-H-TIES phase B without this node's phase-A update (it did not train this round)")
    rec = context.state.array_records[STATE_DELTA]
    return next(iter(rec.values())).numpy()


def handle_query(msg: Message, context: Context, bound: FlowerSettings | None = None) -> Message:
    """``fedproxy.join`` (bundle) or ``fedproxy.sa_reveal`` (the scalar ``h_i``, SA-H-TIES reveal mode)."""
    if JOIN in msg.content.config_records:
        return handle_join(msg, context, bound)
    if REVEAL in msg.content.config_records:
        return handle_reveal(msg, context, _coord_error(_settings(context, bound)))
    raise ConfigError("unknown FedProxy query")


def handle_reveal(msg: Message, context: Context, coord_error: float = 2.0 ** -19) -> Message:
    """``fedproxy.sa_reveal``: this node's ``h_i`` for the broadcast T, once per phase-A update.

    Guarantees: refused (``SecurityError``, nothing revealed) when h was already revealed for the kept
    phase-A update (a server asking again with another T would learn h as a function of T), or when
    T is not this node's x̂ plus K − 1 unit vectors; the T and K answered are kept for phase B.
    """
    from fedproxy_secure.aggregate.sa_hties import sa_client_h, sa_phase_a_client
    from fedproxy_secure.errors import ProtocolAbort
    from fedproxy_secure.protocol.sa_hties_wire import check_t_values

    x = _kept_delta(context)
    if STATE_REVEAL in context.state.config_records:
        raise SecurityError("SA-H-TIES: h was already revealed for this round's update; a second reveal is refused")
    t = next(iter(msg.content.array_records[REVEAL_SUM].values())).numpy()
    k = int(msg.content.config_records[REVEAL]["num_clients"])
    try:
        check_t_values(t, k, own=sa_phase_a_client(x)[0], coord_error=coord_error)
    except ProtocolAbort as exc:
        raise SecurityError(f"SA-H-TIES reveal: {exc}") from None
    context.state.config_records[STATE_REVEAL] = ConfigRecord({"t_sha256": _t_sha256(t), "k": k})
    h = sa_client_h(x, t, k)
    return Message(RecordDict({REVEAL: ConfigRecord({"h": float(h)})}), reply_to=msg)


def secaggplus_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages (those with its ``secaggplus`` config record);
    a plain ``train`` message (``secure = "none"`` runs) goes straight to the handler."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app(settings: FlowerSettings | None = None, extra_mods: tuple = ()) -> ClientApp:
    """A fresh ClientApp (SecAgg+ mod installed; ``train`` and ``query`` handlers registered).

    ``settings`` None = read Flower's run config (``flwr run``); given = bound (``run_simulation``,
    whose run config is empty). ``extra_mods`` run before the SecAgg+ mod (the tests' fault
    injection, :mod:`fedproxy_secure.flower.faults`).
    """
    app = ClientApp(mods=[*extra_mods, secaggplus_when_asked])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, settings)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, settings)

    return app


#: the ClientApp ``flwr run`` loads (``[tool.flwr.app.components] clientapp``)
app = make_client_app()
