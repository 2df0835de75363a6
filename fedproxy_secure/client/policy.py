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
* ``max_rounds`` 100 and ``max_epsilon`` 10.0: the federation may not run, or ask for, more;
* ``require_dp`` true: this site trains only with its own DP-SGD on (checked on ``client.yaml``'s
  ``dp`` when it is loaded, and by ``audit check --client-config``);
* bounds on every field that changes what leaves the site: ``min_clip_norm`` 1e-3 (a tiny clip
  encodes an update to zero), ``train.lr`` within [``min_lr``, ``max_lr``], a SecAgg+ degree of at
  least ``min_neighbours`` (default: the library's own degree for the cohort, the complete graph up
  to 64 sites), ``frac_bits`` of at least ``min_frac_bits``; the LoRA layout, ``a_seed`` and ``dim``
  are pinned at the first accepted round in the state folder (:mod:`fedproxy_secure.client.pins`);
* ``roster`` (fingerprints exchanged out of band, ``client roster``) with ``min_rostered_peers``
  (default: every other cohort member when a roster is set); HE needs a roster
  (``he_requires_roster``), its key holder must be rostered and must be the one the public rotation
  rule names for this round.

What no single-config policy can see (two sites sent two different configs) is caught by the key
agreement: every site signs the signed config's digest into its keys
(:mod:`fedproxy_secure.wire.binding`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.wire.codec import b64d
from fedproxy_secure.protocol.roster import identity_fingerprint, normalise_fingerprint

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
    require_dp: bool = Field(True, description="this site trains only with its own dp.enabled: true (set false "
                                               "only for a test federation without personal data)")
    min_clip_norm: float = Field(1e-3, gt=0, description="smallest clip_norm accepted (a tiny clip encodes "
                                                         "the update to zero)")
    min_lr: float = Field(1e-7, ge=0, description="smallest train.lr accepted")
    max_lr: float = Field(1.0, gt=0, description="largest train.lr accepted")
    min_neighbours: Optional[int] = Field(None, ge=2, description="smallest SecAgg+ degree accepted in "
                                          "secagg_options.neighbours; null: the library's degree for the cohort "
                                          "(the complete graph up to 64 sites)")
    min_frac_bits: int = Field(16, ge=1, le=62, description="smallest fixed-point precision "
                                                           "(secagg_options.frac_bits) accepted")
    roster: frozenset[str] = Field(frozenset(), description="identity fingerprints of the peers this site "
                                   "accepts, exchanged out of band ('client roster' prints a site's own)")
    min_rostered_peers: Optional[int] = Field(None, ge=0, description="fewest other cohort members that must "
                                              "be on the roster; null: every one of them (when a roster is set)")
    he_requires_roster: bool = Field(True, description="HE: refuse a round unless a roster is set (the key "
                                     "holder and the server together read every update of its round)")

    @field_validator("modes")
    @classmethod
    def _not_empty(cls, v: frozenset) -> frozenset:
        if not v:
            raise ValueError("list at least one mode (masking, he or plain)")
        return v

    @field_validator("roster", mode="before")
    @classmethod
    def _fingerprints(cls, v):
        if isinstance(v, str):
            raise ValueError("list the fingerprints (one per peer), not one string")
        return frozenset(normalise_fingerprint(x) for x in (v or ()))

    @model_validator(mode="after")
    def _lr_range(self) -> "ClientPolicy":
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr = {self.min_lr} is above max_lr = {self.max_lr}")
        return self

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

    _check_bounds(policy, cfg, mode, n, rid)
    if policy.roster or (mode == "he" and policy.he_requires_roster):
        _check_roster(policy, cfg, mode, rid, self_identity)

    if policy.max_epsilon is not None:
        dp = (cfg.get("train") or {}).get("dp") or {}
        if dp.get("enabled"):
            eps = dp.get("epsilon")
            ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) \
                and eps <= policy.max_epsilon
            _require(ok, "train.dp.epsilon", eps, f"policy.max_epsilon = {policy.max_epsilon}", rid)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bounds(policy: ClientPolicy, cfg: dict, mode: Any, n: int, rid: Any) -> None:
    """Fields that change what leaves the site: clip norm, lr, SecAgg+ degree, fixed-point precision."""
    from fedproxy_secure.wire.threshold import secagg_plus_degree

    if "clip_norm" in cfg:  # absent: the client cannot clip and stops before anything is sent
        clip = cfg["clip_norm"]
        _require(_number(clip) and clip >= policy.min_clip_norm, "clip_norm", clip,
                 f"policy.min_clip_norm = {policy.min_clip_norm}", rid,
                 "a tiny clip norm encodes this site's update (or its peers') to zero")
    train = cfg.get("train") or {}
    if not isinstance(train, dict):
        raise PolicyViolation("train", type(train).__name__, "a mapping", rid)
    if "lr" in train:
        lr = train["lr"]
        _require(_number(lr) and policy.min_lr <= lr <= policy.max_lr, "train.lr", lr,
                 f"policy.min_lr = {policy.min_lr} .. policy.max_lr = {policy.max_lr}", rid)
    opts = cfg.get("secagg_options") or {}
    if not isinstance(opts, dict):
        raise PolicyViolation("secagg_options", type(opts).__name__, "a mapping", rid)
    k = opts.get("neighbours")
    if k is not None:
        auto = secagg_plus_degree(n)
        need = policy.min_neighbours if policy.min_neighbours is not None else (auto if auto is not None else n - 1)
        _require(isinstance(k, int) and not isinstance(k, bool) and k >= need, "secagg_options.neighbours",
                 k, f"policy.min_neighbours = {policy.min_neighbours} (at least {need} for {n} clients)", rid,
                 "a small degree lets a few colluders hold a majority of this site's share holders")
    fb = opts.get("frac_bits")
    if fb is not None:
        _require(isinstance(fb, int) and not isinstance(fb, bool) and fb >= policy.min_frac_bits,
                 "secagg_options.frac_bits", fb, f"policy.min_frac_bits = {policy.min_frac_bits}", rid)


def _check_roster(policy: ClientPolicy, cfg: dict, mode: Any, rid: Any,
                  self_identity: tuple[int, bytes] | None) -> None:
    """Cohort members on the roster; HE: a roster, a rostered key holder, the public rotation rule."""
    from fedproxy_secure.protocol.he_wire import key_holder_for

    if mode == "he" and policy.he_requires_roster:
        _require(bool(policy.roster), "mode", "he", "policy.he_requires_roster = true", rid,
                 "HE lets the round's key holder and the server read every update: list your peers' "
                 "fingerprints in policy.roster ('client roster' on each site) or set he_requires_roster: false")
    ids = _identity_map(cfg, rid) or {}
    cohort = cfg.get("cohort") or []
    me = str(self_identity[0]) if self_identity is not None else None
    peers = [str(i) for _, i in cohort if str(i) != me]
    rostered = {s for s in peers if s in ids and identity_fingerprint(ids[s]) in policy.roster}
    need = len(peers) if policy.min_rostered_peers is None else min(policy.min_rostered_peers, len(peers))
    _require(len(rostered) >= need, "secagg_options.identities",
             f"{len(rostered)} of {len(peers)} peers on the roster",
             f"policy.min_rostered_peers = {policy.min_rostered_peers} (at least {need})", rid,
             "a member outside the roster may be one the server enrolled itself")
    if mode != "he":
        return
    he = (cfg.get("secagg_options") or {}).get("he") or {}
    kh = he.get("key_holder")
    sids = [i for _, i in cohort]
    names = [c for c, _ in cohort]
    _require(names == sorted(names) and sids == list(range(1, len(sids) + 1)), "cohort", "ids not 1..n in "
             "client-id order", "the public key-holder rotation", rid, "the rotation rule needs the ordered cohort")
    want = key_holder_for(int(rid), len(sids)) if isinstance(rid, int) and sids else None
    _require(kh == want, "secagg_options.he.key_holder", kh, f"the rotation rule ((round - 1) mod n) + 1 = {want}",
             rid, "the server named a key holder out of turn")
    _require(str(kh) == me or str(kh) in rostered, "secagg_options.he.key_holder", kh,
             "a rostered peer (policy.roster)", rid, "the key holder decrypts the round's sum")
