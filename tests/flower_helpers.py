"""What the Flower tests share: the environment of their subprocesses and the ``simulate`` run they compare
Flower with (θ after every round as ``theta_round<r>.npy``, and the clients dropped per round as
``dropped.json``, in the output folder given as its second argument)."""

from __future__ import annotations

import os

SIMULATE = """
import json, sys, numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from fedproxy_secure.config import load_run_config
from fedproxy_secure.lora import get_lora_vector
from fedproxy_secure.pipelines.simulate import federate, prepare
cfg = load_run_config(sys.argv[1]); out = Path(sys.argv[2])
prep = prepare(cfg, lambda m: None, bars=False)
def keep(r, model):
    np.save(out / f"theta_round{r + 1}.npy", get_lora_vector(model), allow_pickle=False)
    return {}
res = federate(cfg, prep, out, lambda m: None, on_round=keep)
(out / "dropped.json").write_text(json.dumps([sorted(int(c) for c in rec["dropped"]) for rec in res.rounds]))
"""


def flower_env() -> dict[str, str]:
    """The environment for Flower and simulate subprocesses: one thread each, offline, quiet Ray."""
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
                         "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONWARNINGS": "ignore"}
