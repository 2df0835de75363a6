"""Every ``audit check`` control, both ways, on deployment views (pure functions, no I/O).

For each control: one deployment it PASSes and one it FAILs (or WARNs, where WARN is its worst
outcome), differing only in the field the control reads. A control that always passed would fail here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from fedproxy_secure.audit.controls import CONTROLS, Deployment, KeyValidity, Policy

NOW = dt.datetime.now(dt.timezone.utc)
SAFE_POLICY = {"modes": ["he", "masking"], "min_cohort": 3, "min_threshold": 2, "min_threshold_fraction": 0.5,
               "require_identities": True, "require_verify_aggregate": True, "allow_h_reveal": False,
               "max_rounds": 100, "max_epsilon": 10.0, "require_dp": True, "he_requires_roster": True,
               "site_dp": {"enabled": True, "epsilon": 8.0}}
BASE = Deployment(kind="network", source="x", n_clients=5, mode="masking", threshold=3, effective_threshold=3,
                  dp_enabled=True, epsilon=4.0, delta=1e-5, clip_norm=1.0, mtls=True, tls_min_version="1.3",
                  keep_ratio=0.5, client_policy=SAFE_POLICY, report_keys_accepted=("epsilon", "status"),
                  report_keys_minimal=("epsilon", "status"), keys=(KeyValidity("cert", NOW + dt.timedelta(days=300)),),
                  audit_log={"path": "a", "ok": True, "lines": 3, "bad_line": None, "reason": "", "keyed": True},
                  server_state="srv", operator_key="encrypted", loose_private_keys=(), private_keys_checked=4,
                  enrol_leftovers=(), revoked_keys=(), operator_key_revoked=False, revoked_sites=())
HE = replace(BASE, mode="he", he_flood=True, he_key_holders=1, verify_aggregate=True)
SA = replace(BASE, aggregator="sa_hties", h_norm="none")

# control -> (passing deployment, unsafe deployment, expected status of the unsafe one)
CASES = {
    "secagg.mode": (BASE, replace(BASE, mode="none"), "FAIL"),
    "secagg.threshold": (BASE, replace(BASE, effective_threshold=2), "FAIL"),  # 2 of 5 is no majority
    "secagg.identity": (BASE, replace(BASE, client_policy={**SAFE_POLICY, "require_identities": False}), "FAIL"),
    "he.flooding": (HE, replace(HE, he_flood=False), "FAIL"),
    "he.shared_key": (BASE, HE, "WARN"),  # N/A outside HE, always a WARN in HE
    "dp.enabled": (BASE, replace(BASE, dp_enabled=False), "FAIL"),
    "dp.epsilon": (BASE, replace(BASE, epsilon=20.0), "FAIL"),
    "update.clip": (BASE, replace(BASE, clip_norm=float("inf")), "FAIL"),
    "transport.mtls": (BASE, replace(BASE, mtls=False, transport_note="no client certificates required"), "FAIL"),
    "proxy.exposure": (BASE, replace(BASE, keep_ratio=0.9), "WARN"),
    "keys.expiry": (BASE, replace(BASE, keys=(KeyValidity("cert", NOW - dt.timedelta(days=1)),)), "FAIL"),
    "audit.chain": (BASE, replace(BASE, audit_log={**BASE.audit_log, "ok": False, "bad_line": 2, "reason": "x"}),
                    "FAIL"),
    "he.verify_aggregate": (HE, replace(HE, verify_aggregate=False), "FAIL"),
    "sa_hties.h_norm": (SA, replace(SA, h_norm="reveal"), "WARN"),
    "client.policy": (BASE, replace(BASE, client_policy={**SAFE_POLICY, "modes": ["masking", "plain"]}), "FAIL"),
    "report.contents": (BASE, replace(BASE, report_keys_accepted=("epsilon", "status", "train_loss")), "FAIL"),
    "keys.operator_at_rest": (BASE, replace(BASE, operator_key="unencrypted"), "FAIL"),
    "keys.permissions": (BASE, replace(BASE, loose_private_keys=("pki/ca.key",)), "FAIL"),
    "enrol.leftovers": (BASE, replace(BASE, enrol_leftovers=("enrol/site0/token",)), "FAIL"),
    "keys.revocation": (BASE, replace(BASE, operator_key_revoked=True, revoked_keys=("abcd",)), "FAIL"),
}


def test_every_control_has_a_case() -> None:
    assert set(CASES) == set(CONTROLS)


@pytest.mark.parametrize("control", sorted(CASES))
def test_control_passes_the_safe_and_flags_the_unsafe_deployment(control: str) -> None:
    good, bad, expected = CASES[control]
    fn = CONTROLS[control]
    ok = fn(good, Policy())
    assert ok.status in ("PASS", "N/A") and ok.control == control, ok
    if control not in ("he.shared_key",):
        assert ok.status == "PASS", ok
    flagged = fn(bad, Policy())
    assert flagged.status == expected, flagged
    assert flagged.threats


def test_h_reveal_policy_turns_the_warning_into_a_failure() -> None:
    bad = replace(SA, h_norm="reveal")
    assert CONTROLS["sa_hties.h_norm"](bad, Policy(h_reveal="FAIL")).status == "FAIL"


def test_server_folder_controls_are_not_applicable_without_one() -> None:
    yaml_only = replace(BASE, server_state=None, operator_key=None, loose_private_keys=None, enrol_leftovers=None,
                        revoked_keys=None, revoked_sites=None, operator_key_revoked=None, keys=(), audit_log=None)
    for c in ("keys.operator_at_rest", "keys.permissions", "enrol.leftovers", "keys.revocation", "keys.expiry",
              "audit.chain"):
        assert CONTROLS[c](yaml_only, Policy()).status == "N/A", c


def test_nothing_networked_passes_unverified() -> None:
    """mTLS and identities are not PASSed for a networked deployment unless something shows them."""
    unknown = replace(BASE, mtls=None, client_policy=None)
    assert CONTROLS["transport.mtls"](unknown, Policy()).status == "WARN"
    assert CONTROLS["secagg.identity"](unknown, Policy()).status == "WARN"
    assert CONTROLS["client.policy"](unknown, Policy()).status == "N/A"


def test_threshold_floor_is_the_round_engines_rule() -> None:
    from fedproxy_secure.wire.threshold import MODE_FLOORS

    for n in range(2, 12):
        floor = MODE_FLOORS["masking"](n)
        at = replace(BASE, n_clients=n, effective_threshold=floor)
        below = replace(BASE, n_clients=n, effective_threshold=floor - 1)
        assert CONTROLS["secagg.threshold"](at, Policy()).status in ("PASS", "WARN")
        assert CONTROLS["secagg.threshold"](below, Policy()).status == "FAIL"


def test_unkeyed_audit_log_warns() -> None:
    d = replace(BASE, audit_log={**BASE.audit_log, "keyed": False})
    assert CONTROLS["audit.chain"](d, Policy()).status == "WARN"


def test_stored_training_statistic_fails_report_contents() -> None:
    d = replace(BASE, report_keys_stored=("epsilon", "num_examples"))
    f = CONTROLS["report.contents"](d, Policy())
    assert f.status == "FAIL" and "num_examples" in f.message
