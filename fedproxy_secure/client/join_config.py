"""``client.yaml`` of ``client join``: enrolment, state, trainer, data file, pinned keyset and DP settings.

Example (paths are relative to the YAML file)::

    enrolment: enrol/site0          # folder handed over by the operator ('server enroll')
    state_dir: state                # identity key, used session ids, privacy budget, anti-rollback state
    trainer: lora                   # lora (real LoRA training on the verified proxy) | synthetic (tests)
    data: train.jsonl               # the site's own data: JSONL prompt/response or a BIG-bench .json task
    keyset: keyset.json             # the operator's keyset, pinned: the proxy bundle is verified against it
    dp: {enabled: true, epsilon: 8.0, delta: 1.0e-5, max_grad_norm: 1.0}
    threads: 1                      # torch threads (several clients on one machine must split the cores)
    he_workers: 2                   # HE mode: processes encrypting/decrypting ciphertexts (default: every core)
    upload_threshold: 4194304       # stage messages above this many bytes go as resumable chunked uploads
    server_retry_s: 120             # keep retrying an unreachable server this long, then stop with its URL
    policy:                         # what a signed round config must satisfy before this site trains
      modes: [masking, he]          #   (client/policy.py; these are the defaults: the safe ones)
      min_cohort: 3
      min_threshold_fraction: 0.5   #   masking: t >= floor(0.5 n) + 1 (strict majority)
      require_identities: true
      require_verify_aggregate: true
      allow_h_reveal: false
      max_rounds: 100
      max_epsilon: 10.0
      require_dp: true              #   refuse to start with dp.enabled false
      min_clip_norm: 0.001          #   bounds on what changes the update that leaves the site
      min_lr: 1.0e-7
      max_lr: 1.0
      min_frac_bits: 16
      roster: []                    #   peers' fingerprints ('client roster' on each site), exchanged out of band
      min_rostered_peers: null      #   null: every other cohort member must be on the roster (when one is set)
      he_requires_roster: true

The LoRA layout (r, alpha, targets) and the A seed are federation-wide and come from the
operator-signed round config; the DP settings are the site's own and never taken from the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from fedproxy_secure.client.policy import ClientPolicy
from fedproxy_secure.config import DPConfig, format_validation_error, read_yaml_mapping
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.strict import StrictModel


class ClientJoinConfig(StrictModel):
    """The validated ``client.yaml``; every path is absolute after :func:`load_join_config`."""

    enrolment: Path
    state_dir: Path = Path("client-state")
    trainer: Literal["lora", "synthetic"] = "lora"
    seed: int = 0
    data: Optional[Path] = None
    limit: Optional[int] = Field(None, ge=1, description="use at most this many training examples")
    keyset: Optional[Path] = None
    dp: DPConfig = DPConfig()
    budget_file: str = "privacy_budget.json"
    threads: int = Field(1, ge=1)
    he_workers: Optional[int] = Field(None, ge=1, description="HE mode: processes that encrypt (and, on the key "
                                      "holder, decrypt) ciphertext chunks in parallel; unset = os.cpu_count()")
    device: str = "cpu"
    scale: float = Field(0.1, gt=0, description="synthetic trainer only: update scale")
    upload_threshold: int = Field(4 << 20, ge=1, description="stage messages above this many bytes go as "
                                  "resumable chunked uploads")
    policy: ClientPolicy = ClientPolicy()
    server_retry_s: float = Field(120.0, gt=0, description="seconds to keep retrying a server that cannot be "
                                  "reached before giving up with one error line naming its URL")

    @model_validator(mode="after")
    def _lora_needs_data_and_keyset(self) -> "ClientJoinConfig":
        if self.trainer == "lora":
            if self.data is None:
                raise ValueError("trainer lora needs 'data' (the site's training file: .jsonl prompt/response or "
                                 "a BIG-bench .json task)")
            if self.keyset is None:
                raise ValueError("trainer lora needs 'keyset' (the operator's pinned keyset file); the proxy "
                                 "bundle is never loaded unverified")
        return self

    @model_validator(mode="after")
    def _dp_required(self) -> "ClientJoinConfig":
        if self.policy.require_dp and not self.dp.enabled:
            raise ValueError("dp.enabled is false but this site's policy.require_dp is true: turn DP-SGD on (dp: "
                             "{enabled: true, epsilon: 8.0, delta: 1.0e-5}) or, only for a test federation without "
                             "personal data, set policy.require_dp: false")
        return self

    @model_validator(mode="after")
    def _dp_within_policy(self) -> "ClientJoinConfig":
        cap = self.policy.max_epsilon
        if self.dp.enabled and cap is not None and self.dp.epsilon > cap:
            raise ValueError(f"dp.epsilon = {self.dp.epsilon} exceeds this site's own policy.max_epsilon = {cap}; "
                             "lower dp.epsilon or raise policy.max_epsilon")
        return self


def load_join_config(path: str | Path) -> ClientJoinConfig:
    """Read and validate ``client.yaml``; relative paths resolve against its folder.

    Raises ConfigError naming the field (``client.yaml: dp.epsilon = -1: ...``) or the missing file.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    try:
        cfg = ClientJoinConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + format_validation_error(exc, model=ClientJoinConfig)) from None
    base = path.resolve().parent
    fix = {k: (base / getattr(cfg, k)) for k in ("enrolment", "state_dir", "data", "keyset")
           if getattr(cfg, k) is not None and not Path(getattr(cfg, k)).is_absolute()}
    cfg = cfg.model_copy(update=fix)
    for k in ("data", "keyset"):
        p = getattr(cfg, k)
        if p is not None and not p.is_file():
            raise ConfigError(f"{path}: {k} = {str(p)!r} does not exist")
    if not (cfg.enrolment / "server.json").is_file():
        raise ConfigError(f"{path}: enrolment = {str(cfg.enrolment)!r} is not an enrolment folder (no server.json); "
                          "use the folder from 'fedproxy-secure server enroll'")
    return cfg


def write_join_config(path: str | Path, **fields) -> Path:
    """Write a ``client.yaml`` (validated first); paths are written as given (relative to ``path``'s folder)."""
    cfg = ClientJoinConfig.model_validate(fields)
    data = cfg.model_dump(mode="json", exclude_none=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)
