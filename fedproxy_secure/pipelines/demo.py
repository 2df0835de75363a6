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
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fedproxy_secure.auditlog import verify_log
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


def _signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _last_round(server_dir: Path) -> dict:
    """The newest round row of the server's store (read-only): id, status, stage; {} if none."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{server_dir / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT round_id, status, stage FROM rounds ORDER BY round_id DESC LIMIT 1").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    return {"round": row[0], "status": row[1], "stage": row[2]} if row else {}


class ServerSupervisor:
    """Runs the server process and restarts it after a crash, at most ``max_restarts`` times.

    A crash is an exit the demo did not ask for with a non-zero code or a signal; each is recorded
    in :attr:`crashes` (UTC time, exit code, signal name, the store's newest round and its stage).
    The restarted server resumes from its SQLite store. One crash more than ``max_restarts`` raises
    FedProxyError naming every crash.
    """

    def __init__(self, cmd: list[str], env: dict, log_path: Path, port: int, server_dir: Path, log,
                 max_restarts: int = 1, pid_file: Path | None = None) -> None:
        self.cmd, self.env, self.log_path, self.port, self.server_dir = cmd, env, log_path, port, server_dir
        self.log, self.max_restarts, self.pid_file = log, max_restarts, pid_file
        self.crashes: list[dict] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server process and wait until it listens (FedProxyError if it exits first)."""
        with open(self.log_path, "ab") as fh:  # the child holds its own copy; close the parent's (no ResourceWarning)
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        if self.pid_file is not None:
            self.pid_file.write_text(f"{self.proc.pid}\n")
        _wait_port(self.port, self.proc, self.log_path)

    def check(self) -> None:
        """Restart the server if it crashed; FedProxyError once the restarts are spent."""
        rc = self.proc.poll() if self.proc is not None else None
        if rc is None or rc == 0:
            return
        crash = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "exit_code": rc,
                 "signal": _signal_name(rc), **_last_round(self.server_dir)}
        self.crashes.append(crash)
        what = crash["signal"] or f"exit code {rc}"
        if len(self.crashes) > self.max_restarts:
            crash["restarted"] = False
            raise FedProxyError(f"the server process died again ({what}, round {crash.get('round')}) after "
                                f"{self.max_restarts} restart(s); crashes: {self.crashes}; see {self.log_path}")
        self.log(f"[bold red]server process died[/] ({what}) during round {crash.get('round')} "
                 f"(stage {crash.get('stage')}); restarting it from its SQLite store")
        crash["restarted"] = True
        self.start()

    def stop(self) -> None:
        """Terminate the server process (the demo's own request: not a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _done_rounds(server_dir: Path) -> int:
    """How many rounds the server's store marks done (read-only; 0 when unreadable)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{server_dir / 'state.db'}?mode=ro", uri=True, timeout=2)
        try:
            return int(con.execute("SELECT COUNT(*) FROM rounds WHERE status = 'done'").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _federate(server_dir: Path, bundle: Path, client_yamls: list[Path], logs: Path, port: int, timeout_s: float,
              log, *, tag: str = "", max_restarts: int = 1, rounds: int = 0, bars=None) -> tuple[list[dict], list[dict]]:
    """Run the supervised server process and one process per client until every client exits (or
    timeout), logging each finished round (and advancing a rounds bar when ``bars`` is a RunProgress).
    Returns ``(client summaries, server crashes)``."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # clients split the cores; each sets torch threads from client.yaml
    cmd = [sys.executable, "-m", "fedproxy_secure.server.runner", str(server_dir), "--port", str(port),
           "--poll", "2", "--bundle", str(bundle)]
    sup = ServerSupervisor(cmd, env, logs / f"server{tag}.log", port, server_dir, log, max_restarts,
                           pid_file=logs / f"server{tag}.pid")
    clients: list[subprocess.Popen] = []
    try:
        sup.start()
        log(f"server{tag} up on https://127.0.0.1:{port} (mTLS, TLS 1.3); starting {len(client_yamls)} client processes")
        for i, y in enumerate(client_yamls):
            with open(logs / f"client{i}{tag}.log", "wb") as fh:  # the child holds its own copy of the handle
                clients.append(subprocess.Popen(
                    [sys.executable, "-m", "fedproxy_secure.client.join_main", "--config", str(y),
                     "--out", str(logs / f"client{i}{tag}.json"), "--max-wait", str(timeout_s)],
                    env=env, stdout=fh, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout_s
        seen, t_round = 0, time.time()
        with (bars.task(f"federation{tag}: rounds", rounds or None) if bars is not None else nullcontext(None)) as adv:
            while any(c.poll() is None for c in clients):
                if time.time() > deadline:
                    log(f"client processes still running at the {timeout_s:.0f} s limit; stopping them")
                    break
                sup.check()
                done = _done_rounds(server_dir)
                if done > seen:
                    log(f"federation{tag}: round {done}/{rounds} done ({time.time() - t_round:.1f} s)")
                    if adv is not None:
                        adv(done - seen)
                    seen, t_round = done, time.time()
                time.sleep(0.5)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        sup.stop()
        if sup.pid_file is not None:
            sup.pid_file.unlink(missing_ok=True)
    out = []
    for i in range(len(client_yamls)):
        p = logs / f"client{i}{tag}.json"
        out.append(json.loads(p.read_text()) if p.is_file() else {"error": f"no summary; see {logs}/client{i}{tag}.log",
                                                                   "returncode": clients[i].returncode})
    return out, sup.crashes


def demo_decomposition(predictions: Path) -> dict:
    """Stage ii (what the federation taught the proxy: tuned − untuned proxy) and stage iii (the share of that
    gain the plug-in carried into the LLM: (fused − LLM)/(tuned − untuned proxy)), DP and no-DP runs, with
    paired bootstrap 95% CIs, from the demo's predictions.jsonl alone."""
    from fedproxy_secure.eval import read_jsonl
    from fedproxy_secure.eval.decomposition import paired_ratios

    rows = read_jsonl(predictions)
    return paired_ratios(rows, {"carried": (("fused", "zs_llm"), ("proxy_tuned", "zs_proxy")),
                                "carried_nodp": (("fused_nodp", "zs_llm"), ("proxy_tuned_nodp", "zs_proxy"))})


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


@dataclass
class _Fed:
    """One finished federation: where it ran and what its store holds."""

    server_dir: Path
    clients_dir: Path
    settings: object
    a_seed: int
    dim: int
    server_pm: object
    summary: dict
    rounds: list
    reports: dict
    theta: np.ndarray
    client_summaries: list[dict]
    crashes: list[dict]

    @property
    def done(self) -> int:
        return sum(r.status == "done" for r in self.rounds)


def _run_federation(spec: DemoSpec, tag: str, out: Path, logs: Path, proxy_model, proxy_dir: Path, data, log,
                    bars=None) -> _Fed:
    """Init a server (``server{tag}``), its keyset, signed bundle and site kits (``clients{tag}``), run the
    supervised federation and read its store back."""
    from fedproxy_secure.lora import set_lora_vector
    from fedproxy_secure.pipelines import demo_prepare as P
    from fedproxy_secure.protocol.roundcfg import state_from_bytes
    from fedproxy_secure.server.app import status_summary
    from fedproxy_secure.server.setup import enroll_site, init_server
    from fedproxy_secure.server.store import SQLiteStore

    server_dir, clients_dir = out / f"server{tag}", out / f"clients{tag}"
    a_seed = P.new_a_seed()
    server_pm, dim = P.lora_layout(spec, proxy_model, a_seed)
    settings = spec.settings(dim, a_seed)
    port = _free_port()
    init_server(server_dir, settings)
    keyset, bundle = P.issue_proxy_bundle(server_dir, proxy_dir, log)
    for k in range(spec.clients.count):
        enroll_site(server_dir, f"site{k}", f"https://127.0.0.1:{port}")
    yamls = P.write_client_kits(spec, server_dir, clients_dir, data, keyset)
    dp = f"DP ε={spec.dp.epsilon} δ={spec.dp.delta}" if spec.dp.enabled else "no DP"
    log(f"federation{tag}: {spec.clients.count} sites, {settings.rounds} rounds, LoRA vector of {dim} values, "
        f"mode {settings.mode}, clip {settings.clip_norm}, {dp}")
    client_summaries, crashes = _federate(server_dir, bundle, yamls, logs, port, spec.timeout_s, log, tag=tag,
                                          max_restarts=spec.eval.server_restarts, rounds=settings.rounds, bars=bars)
    store = SQLiteStore(server_dir / "state.db")
    try:
        summary = status_summary(store)
        rounds = store.rounds()
        reports = {r.round_id: store.client_reports(r.round_id) for r in rounds}
        gs = store.global_state()
    finally:
        store.close()
    if gs is None:
        raise FedProxyError(f"federation{tag}: no round finished, so there is no global LoRA; see {logs}")
    theta = state_from_bytes(gs[1])["theta"]
    set_lora_vector(server_pm, theta)
    return _Fed(server_dir, clients_dir, settings, a_seed, dim, server_pm, summary, rounds, reports, theta,
                client_summaries, crashes)


def _round_rows(fed: _Fed) -> list[dict]:
    """Per-round rows for the report: status, norms, ε and local loss by site."""
    names = {c["client_id"]: c["name"] for c in fed.summary["clients"]}
    # loss and timings never leave a site (minimal report): the demo reads each site's own full report
    local = {(c.get("client_id"), x.get("round_id")): x for c in fed.client_summaries for x in c.get("reports", [])}
    rows = []
    for r, s in zip(fed.rounds, fed.summary["rounds"]):
        reps = {names.get(c, c): x for c, x in fed.reports.get(r.round_id, {}).items()}
        own = {names.get(c, c): x for (c, rid), x in local.items() if rid == r.round_id}
        res_r = r.result or {}
        sa = {k: v for k, v in (res_r.get("sa_hties") or {}).items()
              if k in ("K", "h_norm", "h_range", "mean_conflict", "gated_zero_fraction")}
        holder = (res_r.get("he") or {}).get("key_holder")
        rows.append({**s, "aggregate_norm": res_r.get("aggregate_norm"), "delta_norm": res_r.get("delta_norm"),
                     "sa_hties": sa or None, "he_key_holder": names.get(holder, holder) if holder else None,
                     "survivor_sites": sorted(names.get(c, c) for c in res_r.get("survivors", [])),
                     "epsilon_by_site": {n: x.get("epsilon") for n, x in sorted(reps.items())},
                     "train_loss_by_site": {n: x.get("train_loss") for n, x in sorted(own.items())},
                     "train_seconds_by_site": {n: x.get("seconds") for n, x in sorted(own.items())}})
    return rows


def _mean_loss(rows: list[dict]) -> list[tuple[int, float]]:
    pts = []
    for r in rows:
        v = [x for x in r["train_loss_by_site"].values() if x is not None]
        if v:
            pts.append((r["round"], float(np.mean(v))))
    return pts


def run_demo(out: str | os.PathLike, spec: DemoSpec, log=print, config_path: Path | None = None,
             *, quiet: bool = False) -> dict:
    """Run every stage of the demo in the empty folder ``out``; returns the results dict (also written
    to ``out/results.json``). Raises ConfigError if ``out`` already holds a demo.

    With ``eval.no_dp_baseline`` the same federation also runs without DP (``server_nodp/``,
    ``clients_nodp/``). Every model is scored through :mod:`fedproxy_secure.pipelines.demo_eval`
    (balanced accuracy, prior-only and chance, paired bootstrap CIs vs the zero-shot LLM); each fused
    LLM is written as a signed fused folder and loaded back with ``fuse.load_fused_model`` first.
    """
    import torch

    from fedproxy_secure.config import DPConfig
    from fedproxy_secure.pipelines import demo_prepare as P
    from fedproxy_secure.pipelines.demo_eval import (Evaluation, ci_sentence, fused_logits_fn, legacy_view,
                                                     train_by_task, write_and_load_fused)
    from fedproxy_secure.eval import model_logits_fn
    from fedproxy_secure.progress import RunProgress
    from fedproxy_secure.server.export import save_adapter_on_proxy

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
    ev = Evaluation(tok, data.test_sets, train_by_task(data.client_train), batch_size=spec.eval.batch_size,
                    max_length=spec.eval.max_length, seed=spec.data.seed)
    n_tasks = len(data.test_sets)
    bars = RunProgress(quiet=quiet).__enter__()
    try:
        with st("evaluate LLM before (server)"), bars.task("evaluate LLM (+ proxy) before", n_tasks) as adv:
            ev.score("zs_llm", model_logits_fn(llm), adv)
            if spec.eval.proxy:
                ev.score("zs_proxy", model_logits_fn(proxy.model), adv)
        with st("keys + signed bundle + enrolment + federation (server + client processes)"):
            fed = _run_federation(spec, "", out, logs, proxy.model, work / "proxy", data, log, bars)
        fed_nodp = None
        if spec.eval.no_dp_baseline:
            nodp = spec.model_copy(update={"dp": DPConfig(enabled=False)})
            with st("federation without DP (baseline)"):
                fed_nodp = _run_federation(nodp, "_nodp", out, logs, proxy.model, work / "proxy", data, log, bars)
        shutil.copytree(work / "proxy", out / "proxy")  # the adapters' base model (AutoPeftModelForCausalLM)
        fused_meta = {}
        with st("fuse global LoRA into the LLM (server; signed fused folder)"), bars.task("fusion", 2) as adv:
            save_adapter_on_proxy(fed.server_pm, server_dir / "global_adapter", out / "proxy")
            fused, fused_meta, ks = write_and_load_fused(
                llm_dir, out / "proxy", server_dir / "global_adapter", out / "fused", method=spec.eval.fusion,
                beta=spec.eval.beta, source_round=fed.done, aggregator=fed.settings.aggregator)
            adv(1)
            if fed_nodp is not None:
                save_adapter_on_proxy(fed_nodp.server_pm, out / "server_nodp" / "global_adapter", out / "proxy")
                fused_nodp, _, _ = write_and_load_fused(
                    llm_dir, out / "proxy", out / "server_nodp" / "global_adapter", work / "fused_nodp",
                    method=spec.eval.fusion, beta=spec.eval.beta, source_round=fed_nodp.done,
                    aggregator=fed_nodp.settings.aggregator)
            adv(1)
        with st("evaluate after (server)"), bars.task("evaluate fused LLM (+ proxy) after", n_tasks) as adv:
            ev.score("fused", fused_logits_fn(fused), adv)
            if spec.eval.proxy:
                ev.score("proxy_tuned", model_logits_fn(fed.server_pm), adv)
            if fed_nodp is not None:
                ev.score("fused_nodp", fused_logits_fn(fused_nodp), adv)
                if spec.eval.proxy:
                    ev.score("proxy_tuned_nodp", model_logits_fn(fed_nodp.server_pm), adv)
            ev.add_baselines()
    finally:
        bars.__exit__(None, None, None)
    ev.write_predictions(out / "predictions.jsonl")
    evaluation = ev.summary()
    log(f"fused LLM vs LLM (macro balanced accuracy): {ci_sentence(evaluation, 'fused')}"
        + (f"; without DP: {ci_sentence(evaluation, 'fused_nodp')}" if fed_nodp is not None else ""))

    shutil.copy(server_dir / "audit.jsonl", out / "audit.jsonl")
    _scrub_secrets(server_dir, clients_dir)
    if fed_nodp is not None:
        _scrub_secrets(fed_nodp.server_dir, fed_nodp.clients_dir)
    shutil.rmtree(work, ignore_errors=True)  # LLM copy, proxy folder copy, the non-DP fused folder
    ver = verify_log(out / "audit.jsonl")
    round_rows = _round_rows(fed)
    settings = fed.settings
    results = {
        "name": spec.name, "config": str(config_path) if config_path else None,
        "trainer": "lora (train_round, DP-SGD)" if spec.dp.enabled else "lora (train_round)",
        "model": spec.model.source, "llm_dir": str(llm_dir), "data_dir": str(data.data_dir),
        "clients": spec.clients.count, "client_tasks": data.client_tasks,
        "client_examples": [len(x) for x in data.client_train],
        "test_examples": {t: len(v) for t, v in data.test_sets.items()},
        "calib_tasks": spec.data.calib_tasks,
        "compression": {k: v for k, v in proxy.meta.items() if k not in ("bi_scores",)},
        "lora": spec.lora.model_dump(mode="json"), "lora_dim": fed.dim, "a_seed": fed.a_seed,
        "dp": spec.dp.model_dump(mode="json"), "settings": asdict(settings),
        "rounds_done": fed.done, "rounds": round_rows, "client_summaries": fed.client_summaries,
        "server_crashes": fed.crashes,
        "evaluation": evaluation,
        "stage_decomposition": demo_decomposition(out / "predictions.jsonl") if spec.eval.proxy else None,
        "fusion": {"method": spec.eval.fusion, "beta": spec.eval.beta, "folder": "fused", "keyset": ks.name,
                   "loaded_with": "fedproxy_secure.fuse.load_fused_model",
                   **{k: fused_meta.get(k) for k in ("layer_map", "modules_fused", "proxy_shares_llm_blocks")}},
        "llm_before": legacy_view(evaluation, "zs_llm"), "llm_after": legacy_view(evaluation, "fused"),
        "proxy_before": legacy_view(evaluation, "zs_proxy") if spec.eval.proxy else None,
        "proxy_after": legacy_view(evaluation, "proxy_tuned") if spec.eval.proxy else None,
        "no_dp": None if fed_nodp is None else {
            "rounds_done": fed_nodp.done, "server_crashes": fed_nodp.crashes,
            "global_theta_norm": float(np.linalg.norm(fed_nodp.theta)),
            "llm_after": legacy_view(evaluation, "fused_nodp"),
            "train_loss": _mean_loss(_round_rows(fed_nodp)),
            "client_summaries": fed_nodp.client_summaries},
        "train_loss": _mean_loss(round_rows),
        "global_theta_norm": float(np.linalg.norm(fed.theta)),
        "stage_seconds": st.seconds, "seconds": round(time.perf_counter() - t_all, 2),
        "torch_threads": {"server_side": spec.eval.threads, "per_client": spec.clients.threads},
        "audit_log_ok": ver.ok, "audit_entries": ver.lines,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    from fedproxy_secure.pipelines.demo_report import plot, write_report

    plot(out, results)
    write_report(out / "report.md", results)
    return results
