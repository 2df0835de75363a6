"""The whole networked FedProxy flow on loopback, with real training.

Stages (each timed): fetch the LLM and the tasks; split the data into per-site files and the
operator's held-out test split; compress the LLM into the proxy on server calibration text; evaluate
the LLM (before); ``server init`` + operator keyset + signed proxy bundle + enrolments; the
federation (server process + one process per site: each fetches the bundle over the API, verifies
it against its pinned keyset before loading, attaches LoRA with the signed A seed, trains with
DP-SGD, clips and submits through the configured secure aggregation: masking, HE (CKKS, rotating key
holder; examples/demo-tiny-he.yaml) or SA-H-TIES over masking (examples/demo-tiny-sa-hties.yaml));
fuse the final global LoRA into the LLM (server only); evaluate the LLM (after); report.

Writes into ``out``: ``report.md``, ``results.json``, ``rounds.png``, ``audit.jsonl``, ``server/``
(state.db, audit log, federation.json, keyset, bundle, global adapter; private keys, the HE statement key
included, removed),
``clients/`` (each site's client.yaml, data file, privacy budget; private keys removed), ``logs/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedproxy_secure.audit.log import verify_log
from fedproxy_secure.errors import ConfigError, FedProxyError
from fedproxy_secure.pipelines.demo_config import DemoSpec, load_demo_spec

__all__ = ["load_demo_spec", "run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stages:
    """Wall time per stage, in order."""

    def __init__(self, log) -> None:
        self.seconds: dict[str, float] = {}
        self.log = log

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.log(f"[stage] {name}: {self.seconds[name]} s")


def _wait_port(port: int, srv: subprocess.Popen, log_path: Path) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if srv.poll() is not None:
                raise FedProxyError(f"server exited: see {log_path}")
            time.sleep(0.1)
    raise FedProxyError(f"server did not open port {port}: see {log_path}")


def _federate(server_dir: Path, bundle: Path, client_yamls: list[Path], logs: Path, port: int, timeout_s: float,
              log) -> list[dict]:
    """Run the server process and one process per client until every client exits (or timeout)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # clients split the cores; each sets torch threads from client.yaml
    srv = subprocess.Popen([sys.executable, "-m", "fedproxy_secure.server.runner", str(server_dir), "--port", str(port),
                            "--poll", "2", "--bundle", str(bundle)],
                           env=env, stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT)
    clients: list[subprocess.Popen] = []
    try:
        _wait_port(port, srv, logs / "server.log")
        log(f"server up on https://127.0.0.1:{port} (mTLS, TLS 1.3); starting {len(client_yamls)} client processes")
        for i, y in enumerate(client_yamls):
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "fedproxy_secure.client.join_main", "--config", str(y),
                 "--out", str(logs / f"client{i}.json"), "--max-wait", str(timeout_s)],
                env=env, stdout=open(logs / f"client{i}.log", "wb"), stderr=subprocess.STDOUT))
        deadline = time.time() + timeout_s
        for c in clients:
            try:
                c.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log(f"client process {c.pid} still running at the {timeout_s:.0f} s limit; stopping it")
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
    out = []
    for i in range(len(client_yamls)):
        p = logs / f"client{i}.json"
        out.append(json.loads(p.read_text()) if p.is_file() else {"error": f"no summary; see {logs}/client{i}.log",
                                                                   "returncode": clients[i].returncode})
    return out


def _scrub_secrets(server_dir: Path, clients_dir: Path) -> None:
    """Remove every private key and token from the output folder."""
    for secret in (server_dir / "pki" / "ca.key", server_dir / "pki" / "server.key", server_dir / "keys" / "operator.key",
                   server_dir / "keys" / "he_statement.key",  # mode he: the server's statement-signing key
                   server_dir / "keys" / "audit.secret"):  # audit-log MAC key (the copied log's hash chain still verifies)
        secret.unlink(missing_ok=True)
    shutil.rmtree(server_dir / "enrol", ignore_errors=True)
    for site in clients_dir.glob("site*"):
        shutil.rmtree(site / "enrol", ignore_errors=True)
        (site / "state" / "identity.key").unlink(missing_ok=True)


def _evaluate(model, tok, test_sets, spec: DemoSpec) -> dict:
    from fedproxy_secure.eval import evaluate_tasks, model_logits_fn

    return evaluate_tasks(model_logits_fn(model), tok, test_sets, batch_size=spec.eval.batch_size,
                          max_length=spec.eval.max_length).to_dict()


def run_demo(out: str | os.PathLike, spec: DemoSpec, log=print, config_path: Path | None = None) -> dict:
    """Run every stage of the demo in the empty folder ``out``; returns the results dict (also written
    to ``out/results.json``). Raises ConfigError if ``out`` already holds a demo."""
    import torch

    from fedproxy_secure.fuse.adapter import deltas_from_peft_model
    from fedproxy_secure.fuse.weight import fuse_weights
    from fedproxy_secure.lora import save_adapter, set_lora_vector
    from fedproxy_secure.pipelines import demo_prepare as P
    from fedproxy_secure.server.app import status_summary
    from fedproxy_secure.protocol.roundcfg import state_from_bytes
    from fedproxy_secure.server.setup import enroll_site, init_server
    from fedproxy_secure.server.store import SQLiteStore

    out = Path(out)
    server_dir, clients_dir, logs, work = out / "server", out / "clients", out / "logs", out / "work"
    if server_dir.exists() or clients_dir.exists():
        raise ConfigError(f"{out} already holds a demo (server/ or clients/ exists); pass an empty --out folder")
    for d in (out, logs, work):
        d.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(spec.eval.threads)
    st = _Stages(log)
    t_all = time.perf_counter()

    with st("fetch model + data"):
        llm_dir, data_dir = P.fetch_inputs(spec, work, log)
    with st("split data"):
        data = P.split_data(spec, data_dir)
    with st("compress (server)"):
        llm, tok, proxy, base_hash = P.compress_llm(spec, llm_dir, data.calib_texts, work / "proxy", log)
    with st("evaluate LLM before (server)"):
        llm_before = _evaluate(llm, tok, data.test_sets, spec)
        proxy_before = _evaluate(proxy.model, tok, data.test_sets, spec) if spec.eval.proxy else None
    log(f"LLM before: mean accuracy {llm_before['mean_accuracy']:.4f}")
    with st("keys + signed bundle + enrolment"):
        a_seed = P.new_a_seed()
        server_pm, dim = P.lora_layout(spec, proxy.model, a_seed)
        settings = spec.settings(dim, a_seed)
        port = _free_port()
        init_server(server_dir, settings)
        keyset, bundle = P.issue_proxy_bundle(server_dir, work / "proxy", log)
        for k in range(spec.clients.count):
            enroll_site(server_dir, f"site{k}", f"https://127.0.0.1:{port}")
        yamls = P.write_client_kits(spec, server_dir, clients_dir, data, keyset)
    log(f"federation: {spec.clients.count} sites, {settings.rounds} rounds, LoRA vector of {dim} values, "
        f"mode {settings.mode}, clip {settings.clip_norm}, DP ε={spec.dp.epsilon} δ={spec.dp.delta}")
    with st("federation (server + client processes)"):
        client_summaries = _federate(server_dir, bundle, yamls, logs, port, spec.timeout_s, log)

    store = SQLiteStore(server_dir / "state.db")
    try:
        summary = status_summary(store)
        rounds = store.rounds()
        reports = {r.round_id: store.client_reports(r.round_id) for r in rounds}
        gs = store.global_state()
    finally:
        store.close()
    done = sum(r.status == "done" for r in rounds)
    theta = state_from_bytes(gs[1])["theta"]
    with st("fuse global LoRA into the LLM (server)"):
        set_lora_vector(server_pm, theta)
        save_adapter(server_pm, server_dir / "global_adapter")
        deltas = deltas_from_peft_model(server_pm)
        fused = fuse_weights(llm, proxy.meta, deltas)
    with st("evaluate LLM after (server)"):
        llm_after = _evaluate(fused, tok, data.test_sets, spec)
        proxy_after = _evaluate(server_pm, tok, data.test_sets, spec) if spec.eval.proxy else None
    log(f"LLM after: mean accuracy {llm_after['mean_accuracy']:.4f}")

    shutil.copy(server_dir / "audit.jsonl", out / "audit.jsonl")
    _scrub_secrets(server_dir, clients_dir)
    shutil.rmtree(work, ignore_errors=True)  # LLM copy / proxy folder (the bundle keeps the proxy)
    ver = verify_log(out / "audit.jsonl")
    names = {c["client_id"]: c["name"] for c in summary["clients"]}
    # loss and timings never leave a site (minimal report): the demo reads each site's own full report
    local = {(c.get("client_id"), x.get("round_id")): x for c in client_summaries for x in c.get("reports", [])}
    round_rows = []
    for r, s in zip(rounds, summary["rounds"]):
        reps = {names.get(c, c): x for c, x in reports.get(r.round_id, {}).items()}
        own = {names.get(c, c): x for (c, rid), x in local.items() if rid == r.round_id}
        res_r = r.result or {}
        sa = {k: v for k, v in (res_r.get("sa_hties") or {}).items()
              if k in ("K", "h_norm", "h_range", "mean_conflict", "gated_zero_fraction")}
        holder = (res_r.get("he") or {}).get("key_holder")
        round_rows.append({**s, "aggregate_norm": res_r.get("aggregate_norm"), "delta_norm": res_r.get("delta_norm"),
                           "sa_hties": sa or None, "he_key_holder": names.get(holder, holder) if holder else None,
                           "survivor_sites": sorted(names.get(c, c) for c in res_r.get("survivors", [])),
                           "epsilon_by_site": {n: x.get("epsilon") for n, x in sorted(reps.items())},
                           "train_loss_by_site": {n: x.get("train_loss") for n, x in sorted(own.items())},
                           "train_seconds_by_site": {n: x.get("seconds") for n, x in sorted(own.items())}})
    results = {
        "name": spec.name, "config": str(config_path) if config_path else None,
        "trainer": "lora (train_round, DP-SGD)" if spec.dp.enabled else "lora (train_round)",
        "model": spec.model.source, "llm_dir": str(llm_dir), "data_dir": str(data.data_dir),
        "clients": spec.clients.count, "client_tasks": data.client_tasks,
        "client_examples": [len(x) for x in data.client_train],
        "test_examples": {t: len(v) for t, v in data.test_sets.items()},
        "calib_tasks": spec.data.calib_tasks,
        "compression": {k: v for k, v in proxy.meta.items() if k not in ("bi_scores",)},
        "lora": spec.lora.model_dump(mode="json"), "lora_dim": dim, "a_seed": a_seed,
        "dp": spec.dp.model_dump(mode="json"), "settings": asdict(settings),
        "rounds_done": done, "rounds": round_rows, "client_summaries": client_summaries,
        "llm_before": llm_before, "llm_after": llm_after, "proxy_before": proxy_before, "proxy_after": proxy_after,
        "global_theta_norm": float(np.linalg.norm(theta)),
        "stage_seconds": st.seconds, "seconds": round(time.perf_counter() - t_all, 2),
        "torch_threads": {"server_side": spec.eval.threads, "per_client": spec.clients.threads},
        "audit_log_ok": ver.ok, "audit_entries": ver.lines,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    from fedproxy_secure.pipelines.demo_report import plot, write_report

    plot(out / "rounds.png", results)
    write_report(out / "report.md", results)
    return results
