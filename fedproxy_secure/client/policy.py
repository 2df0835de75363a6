"""The site's own security policy for round configs, pinned in ``client.yaml`` (section ``policy``).

The operator signs every round config, but the key that signs it lives with the server, so a
compromised (or careless) server can sign a config that quietly weakens the protection of the
site's update. The client therefore checks each verified round config against a policy the site
fixed in advance, and refuses the round *before* it fetches the global state or trains.

Defaults are the safe ones:

* ``modes``: masking or he; ``plain`` (the update in the clear) only when listed explicitly;
* ``min_cohort`` 3: with two clients the published sum minus one's own update is the other's;
* ``min_threshold_fraction`` 0.5, masking only: t must be a strict majority of the cohort,
  ``t >= floor(0.5 * n) + 1``. Two sets of t clients then always share a member, so a server
  cannot split the survivors into two disjoint groups and collect from one the mask-key shares
  ("dropped") and from the other the self-mask shares ("alive") of the same client. This is the
  rule the honest server already applies (``n // 2 + 1``), so an honest config always passes;
* ``min_threshold`` 2, every mode: a revealed "sum" of one update is that update;
* ``require_identities``: the config carries an enrolled Ed25519 identity for every cohort member
  (and ours is ours), which turns on the key-substitution checks of masking and HE;
* ``require_verify_aggregate``: HE clients recompute the aggregate they are asked to decrypt;
* ``allow_h_reveal`` false: SA-H-TIES with ``h_norm: reveal`` sends each h_i in the clear;
* ``max_rounds`` 100 and ``max_epsilon`` 10.0: the federation may not run, or ask for, more.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.protocol.codec import b64d

Mode = Literal["masking", "he", "plain"]
#: the modes a round config may name; ``none`` is the simulator's name for plain
_MODE_ALIASES = {"none": "plain"}


class PolicyViolation(SecurityError):
    """A signed round config breaks the site's pinned policy; nothing was trained or sent.

    ``field`` names the round-config field, ``server_value`` what the server asked for and
    ``policy_value`` what ``client.yaml``'s ``policy`` section allows.
    """

    def __init__(self, field: str, server_value: Any, policy_value: Any, round_id: Any = None, why: str = "") -> None:
        self.field, self.server_value, self.policy_value, self.round_id = field, server_value, policy_value, round_id
        where = f"round {round_id}: " if round_id is not None else ""
        msg = (f"{where}round config {field} = {server_value!r} is refused by this site's policy "
               f"({policy_value}){': ' + why if why else ''}; nothing was trained or sent. If the operator "
               "changed this on purpose, the site must relax its policy in client.yaml")
        super().__init__(msg)

    def as_record(self) -> dict:
        """The refusal as a JSON-able dict (for the client's local audit log)."""
        return {"round": self.round_id, "field": self.field, "server_value": _jsonable(self.server_value),
                "policy_value": _jsonable(self.policy_value), "reason": str(self)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        return sorted(_jsonable(x) for x in v) if isinstance(v, (set, frozenset)) else [_jsonable(x) for x in v]
    return str(v)


class ClientPolicy(BaseModel):
    """What a round config must satisfy before this site trains (``client.yaml`` ``policy``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modes: frozenset[Mode] = Field(frozenset({"masking", "he"}),
                                   description="secure-aggregation modes this site accepts; list plain only for "
                                               "a test federation (the update then leaves the site in the clear)")
    min_cohort: int = Field(3, ge=2, description="fewest clients in a round's cohort")
    min_threshold: int = Field(2, ge=1, description="fewest updates in any revealed sum (every mode)")
    min_threshold_fraction: float = Field(0.5, ge=0.0, lt=1.0,
                                          description="masking: t must exceed this fraction of the cohort")
    require_identities: bool = Field(True, description="the config must carry every cohort member's identity key")
    require_verify_aggregate: bool = Field(True, description="HE: the config must keep verify_aggregate on")
    allow_h_reveal: bool = Field(False, description="SA-H-TIES: accept h_norm reveal (each h_i sent in the clear)")
    max_rounds: int = Field(100, ge=1, description="no round id or total_rounds above this")
    max_epsilon: Optional[float] = Field(10.0, gt=0, description="no DP ε above this in the round config "
                                                                 "(train.dp.epsilon) nor in this site's dp; "
                                                                 "null: no cap")

    @field_validator("modes")
    @classmethod
    def _not_empty(cls, v: frozenset) -> frozenset:
        if not v:
            raise ValueError("list at least one mode (masking, he or plain)")
        return v

    def strict_majority(self, n: int) -> int:
        """The smallest masking threshold this policy accepts for a cohort of ``n``."""
        return max(self.min_threshold, math.floor(self.min_threshold_fraction * n) + 1)


def _require(ok: bool, field: str, server_value: Any, policy_value: Any, rid: Any, why: str = "") -> None:
    if not ok:
        raise PolicyViolation(field, server_value, policy_value, rid, why)


def _identity_map(cfg: dict, rid: Any) -> dict[str, bytes] | None:
    ids = (cfg.get("secagg_options") or {}).get("identities")
    if ids is None:
        return None
    if not isinstance(ids, dict):
        raise PolicyViolation("secagg_options.identities", type(ids).__name__, "policy.require_identities = true",
                              rid, "must map each cohort id to a 32-byte key")
    out = {}
    for k, v in ids.items():
        try:
            raw = b64d(v, f"identities[{k}]", 64)
        except ProtocolAbort:
            raw = b""
        if len(raw) != 32:
            raise PolicyViolation(f"secagg_options.identities[{k}]", v, "policy.require_identities = true", rid,
                                  "not a base64 32-byte Ed25519 key")
        out[str(k)] = raw
    return out


def check_round_policy(policy: ClientPolicy, cfg: dict, *, self_identity: tuple[int, bytes] | None = None) -> None:
    """Raise :class:`PolicyViolation` if the (already signature-checked) round config ``cfg``
    breaks ``policy``; return None when every rule holds.

    Pure: reads only ``cfg``. Checks mode, cohort size, threshold (absolute, and a strict
    majority for masking), identities for every cohort member (``self_identity = (sid, raw
    public key)`` must match ours), HE ``verify_aggregate``, SA-H-TIES ``h_norm``, round id and
    ``total_rounds`` against ``max_rounds``, and ``train.dp.epsilon`` against ``max_epsilon``.
    A missing field counts as the value the client code would use (e.g. ``h_norm`` defaults to
    reveal, ``verify_aggregate`` to true), so omitting a field is never a way around the policy.
    """
    rid = cfg.get("round_id")
    mode = _MODE_ALIASES.get(str(cfg.get("mode")), cfg.get("mode"))
    _require(mode in policy.modes, "mode", cfg.get("mode"), f"policy.modes = {sorted(policy.modes)}", rid)

    cohort = cfg.get("cohort") or []
    n = len(cohort)
    _require(n >= policy.min_cohort, "cohort", f"{n} clients", f"policy.min_cohort = {policy.min_cohort}", rid)

    t = cfg.get("threshold")
    _require(isinstance(t, int) and not isinstance(t, bool), "threshold", t, "an integer", rid)
    _require(t >= policy.min_threshold, "threshold", t, f"policy.min_threshold = {policy.min_threshold}", rid)
    if mode == "masking":
        need = policy.strict_majority(n)
        _require(t >= need, "threshold", f"{t} of {n}",
                 f"policy.min_threshold_fraction = {policy.min_threshold_fraction}: t >= {need} for {n} clients", rid)

    if policy.require_identities:
        ids = _identity_map(cfg, rid)
        _require(ids is not None, "secagg_options.identities", None, "policy.require_identities = true", rid,
                 "without them a server can substitute a client's keys unnoticed")
        sids = sorted(str(i) for _, i in cohort)
        missing = [s for s in sids if s not in ids]
        _require(not missing, "secagg_options.identities", f"missing for cohort ids {missing}",
                 "policy.require_identities = true", rid)
        if self_identity is not None:
            sid, raw = self_identity
            _require(ids.get(str(sid)) == raw, f"secagg_options.identities[{sid}]", "a key that is not ours",
                     "policy.require_identities = true", rid, "the server substituted this site's identity key")

    if mode == "he" and policy.require_verify_aggregate:
        he = (cfg.get("secagg_options") or {}).get("he") or {}
        va = he.get("verify_aggregate", True)
        _require(va is True, "secagg_options.he.verify_aggregate", va, "policy.require_verify_aggregate = true", rid)

    if cfg.get("aggregator") == "sa_hties" and not policy.allow_h_reveal:
        h_norm = (cfg.get("sa_hties") or {}).get("h_norm", "reveal")
        _require(h_norm == "none", "sa_hties.h_norm", h_norm, "policy.allow_h_reveal = false", rid,
                 "reveal sends each site's h_i in the clear")

    _require(isinstance(rid, int) and 1 <= rid <= policy.max_rounds, "round_id", rid,
             f"policy.max_rounds = {policy.max_rounds}", rid)
    total = cfg.get("total_rounds")
    _require(isinstance(total, int) and total <= policy.max_rounds, "total_rounds", total,
             f"policy.max_rounds = {policy.max_rounds}", rid)

    if policy.max_epsilon is not None:
        dp = (cfg.get("train") or {}).get("dp") or {}
        if dp.get("enabled"):
            eps = dp.get("epsilon")
            ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) \
                and eps <= policy.max_epsilon
            _require(ok, "train.dp.epsilon", eps, f"policy.max_epsilon = {policy.max_epsilon}", rid)
