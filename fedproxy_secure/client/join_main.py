"""Light entry point for a joining client (no typer import; torch only when the LoRA trainer runs).

``python -m fedproxy_secure.client.join_main --config client.yaml`` (see ``client/join_config.py``),
or the test form ``--enrol DIR --state DIR [--seed N]`` with the synthetic trainer. Writes a JSON
summary to ``--out``. ``--die-at ROUND:STAGE`` crashes the process there (tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from fedproxy_secure.client.join import join_federation, synthetic_train_fn
from fedproxy_secure.client.upload import DEFAULT_THRESHOLD


def run_from_config(cfg, server: str | None = None, log=None, die_at=None, max_wait_s: float = 3600.0):
    """Join with a validated :class:`ClientJoinConfig`: the synthetic trainer, or fetch + verify the
    proxy bundle over the API, load the site's data and train LoRA each round. HE rounds encrypt on
    ``cfg.he_workers`` processes (every core when unset)."""
    from fedproxy_secure.secagg.he_workers import set_default_workers

    set_default_workers(cfg.he_workers)
    if cfg.trainer == "synthetic":
        return join_federation(cfg.enrolment, cfg.state_dir, synthetic_train_fn(cfg.seed, cfg.scale), server,
                               log=log, die_at=die_at, max_wait_s=max_wait_s, upload_threshold=cfg.upload_threshold,
                               policy=cfg.policy, retry_s=cfg.server_retry_s)
    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    from fedproxy_secure.client.local import load_examples
    from fedproxy_secure.client.net_lora import load_bundle_from_server, lora_train_fn

    examples = load_examples(cfg.data, cfg.limit)

    def setup(session):
        model, tok, _ = load_bundle_from_server(session, cfg.keyset, cfg.state_dir, log=log)
        if log:
            log(f"{len(examples)} local training examples from {cfg.data.name}; DP "
                + (f"on (ε={cfg.dp.epsilon}, δ={cfg.dp.delta})" if cfg.dp.enabled else "off"))
        return lora_train_fn(model, tok, examples, cfg, cfg.state_dir, log=log)

    return join_federation(cfg.enrolment, cfg.state_dir, None, server, log=log, die_at=die_at,
                           max_wait_s=max_wait_s, setup=setup, upload_threshold=cfg.upload_threshold,
                           policy=cfg.policy, retry_s=cfg.server_retry_s)


def _policy_file(path: str):
    """A :class:`ClientPolicy` from a YAML/JSON file (ConfigError naming the field)."""
    from pydantic import ValidationError

    from fedproxy_secure.client.policy import ClientPolicy
    from fedproxy_secure.config import format_validation_error, read_yaml_mapping
    from fedproxy_secure.errors import ConfigError

    try:
        return ClientPolicy.model_validate(read_yaml_mapping(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: policy." + format_validation_error(exc, model=ClientPolicy)) from None


def main(argv: list[str] | None = None) -> int:
    """Run one client until the federation ends; exit 0, or 3 when it refused the server (a round config
    against the site's policy or a failed security check; printed, and audited in the state dir)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="client.yaml (enrolment, state_dir, trainer, data, keyset, dp)")
    ap.add_argument("--enrol", default=None)
    ap.add_argument("--state", default=None)
    ap.add_argument("--server", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--die-at", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-wait", type=float, default=3600.0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--policy", default=None, help="test form: a JSON/YAML file with the site policy "
                                                   "(client.yaml's policy section; default: the safe policy)")
    ap.add_argument("--upload-threshold", type=int, default=None,
                    help="stage messages above this many bytes go as chunked uploads (default 4 MiB)")
    a = ap.parse_args(argv)
    die = None
    if a.die_at:
        r, st = a.die_at.split(":")
        die = (int(r), st)
    tag = a.seed if a.config is None else a.config
    log = (lambda m: None) if a.quiet else (lambda m: print(f"[{tag}] {m}", file=sys.stderr, flush=True))
    if a.config:
        from fedproxy_secure.client.join_config import load_join_config

        cfg = load_join_config(a.config)
        if a.upload_threshold is not None:
            cfg = cfg.model_copy(update={"upload_threshold": a.upload_threshold})
    from fedproxy_secure.errors import SecurityError

    try:
        if a.config:
            res = run_from_config(cfg, a.server, log=log, die_at=die, max_wait_s=a.max_wait)
        else:
            if not (a.enrol and a.state):
                ap.error("give --config client.yaml, or --enrol DIR --state DIR (synthetic trainer)")
            res = join_federation(a.enrol, a.state, synthetic_train_fn(a.seed, a.scale), a.server, log=log,
                                  die_at=die, max_wait_s=a.max_wait,
                                  upload_threshold=a.upload_threshold or DEFAULT_THRESHOLD,
                                  policy=_policy_file(a.policy) if a.policy else None)
    except SecurityError as exc:
        print(f"[{tag}] refused: {exc}", file=sys.stderr, flush=True)
        return 3
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(asdict(res), fh, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
