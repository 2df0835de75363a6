"""The mode seam: a test-only mode added in this one file plus one ``register_mode`` call runs end
to end through the unchanged round engine (stages, deadlines, threshold, round options, per-message
validation, refusals reaching the audit log, ``finish`` through ``aggregate/``)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedproxy_secure.aggregate.fedavg import fedavg
from fedproxy_secure.errors import ConfigError, ProtocolAbort
from fedproxy_secure.pipelines.inmemory import InMemoryFederation
from fedproxy_secure.wire.codec import vec_from_b64, vec_to_b64
from fedproxy_secure.protocol.modes import Finish, Mode, RoundContext, register_mode, resolve, unregister
from fedproxy_secure.protocol.settings import FederationSettings

DIM = 6


# ----------------------------------------------------------------------------- the test-only mode
class CommitRevealServer:
    """Clients first commit to SHA-256(session || vector), then reveal the vector; the server checks it."""

    stages = ("tm_commit", "tm_reveal")

    def __init__(self, ctx: RoundContext) -> None:
        self.dim, self.session = ctx.dim, ctx.session_id
        self.commits: dict[int, str] = {}
        self.vectors: dict[int, np.ndarray] = {}
        self.rejections: dict[int, str] = {}

    def validate(self, stage: str, msg: dict, sid: int) -> None:
        want = {"tm_commit": {"type", "digest"}, "tm_reveal": {"type", "vector"}}[stage]
        if not isinstance(msg, dict) or set(msg) != want or msg.get("type") != stage:
            raise ProtocolAbort(f"{stage}: malformed message")

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        if stage == "tm_commit":
            self.commits = {sid: m["digest"] for sid, m in inputs.items()}
            return {sid: {"type": "tm_go", "committed": sorted(self.commits)} for sid in inputs}
        for sid, m in sorted(inputs.items()):
            v = vec_from_b64(m["vector"], self.dim)
            if hashlib.sha256(self.session + v.tobytes()).hexdigest() != self.commits.get(sid):
                self.rejections[sid] = "revealed vector does not match the commitment"
                continue
            self.vectors[sid] = v
        return None

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        return sum(self.vectors.values()), tuple(sorted(self.vectors))


class CommitRevealClient:
    stages = CommitRevealServer.stages

    def __init__(self, vector: np.ndarray, session: bytes) -> None:
        self.v, self.session = np.asarray(vector, dtype="<f8"), session

    def step(self, stage: str, server_msg: dict) -> dict:
        if stage == "tm_commit":
            return {"type": "tm_commit", "digest": hashlib.sha256(self.session + self.v.tobytes()).hexdigest()}
        assert server_msg["type"] == "tm_go"
        return {"type": "tm_reveal", "vector": vec_to_b64(self.v)}


class CommitRevealMode(Mode):
    name = "test_commit_reveal"
    base_stages = CommitRevealServer.stages
    deadlines = {"tm_commit": 5.0, "tm_reveal": 7.0}

    def validate_settings(self, s) -> None:
        if s.clip_norm > 10:
            raise ConfigError(f"federation.clip_norm={s.clip_norm}: test_commit_reveal needs <= 10")

    def round_options(self, s, round_id, n, session_id, he_key) -> dict:
        return {"secagg_options": {"commit_hash": "sha256"}}

    def server_stages(self, ctx: RoundContext):
        assert ctx.config["secagg_options"]["commit_hash"] == "sha256"  # round options reach the signed config
        return CommitRevealServer(ctx)

    def client_stages(self, cfg, vector, sid, **_):
        return CommitRevealClient(vector, bytes.fromhex(cfg["session_id"]))

    def finish(self, proto, theta, s, names) -> Finish:
        # the individual vectors are public in this mode, so the step is plain fedavg from aggregate/
        ids = sorted(proto.vectors)
        delta = fedavg([proto.vectors[i] for i in ids])
        return Finish(delta=delta, survivors=tuple(ids), result={"revealed": [names[i] for i in ids]})


@pytest.fixture
def commit_reveal():
    register_mode(CommitRevealMode())  # the registration
    yield
    unregister(CommitRevealMode.name)


# ----------------------------------------------------------------------------- tests
def _updates(clients: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: np.clip(0.2 * rng.standard_normal(DIM), -0.5, 0.5) for c in clients}


def _audit(fed: InMemoryFederation) -> list[dict]:
    return [json.loads(line) for line in fed.audit_path.read_text().splitlines()]


def test_test_only_mode_runs_end_to_end_through_the_engine(tmp_path, commit_reveal) -> None:
    s = FederationSettings.from_dict({"rounds": 2, "min_clients": 3, "threshold": 2, "mode": CommitRevealMode.name,
                                      "dim": DIM})
    fed = InMemoryFederation(tmp_path, s, n=3)
    assert fed.engine.round_stages() == ("tm_commit", "tm_reveal")
    assert fed.engine.mode.deadline(s, "tm_reveal") == 7.0
    ups = _updates(fed.clients)
    out = fed.run_round(ups)
    assert out.row.status == "done", out.row.reason
    np.testing.assert_allclose(out.theta, np.mean([ups[c] for c in fed.clients], axis=0), atol=1e-12)
    assert out.row.result["revealed"] == fed.clients
    assert out.row.config["threshold"] == 2  # the one threshold rule: no floor for an unknown mode

    # a client whose reveal does not match its commitment is refused; the reason reaches the audit log
    bad = fed.clients[1]

    def tamper(stage, c, reply):
        if stage == "tm_reveal" and c == bad:
            return {"type": "tm_reveal", "vector": vec_to_b64(np.ones(DIM))}
        return reply

    theta0 = out.theta
    ups2 = _updates(fed.clients, seed=1)
    out2 = fed.run_round(ups2, tamper=tamper)
    assert out2.row.status == "done"
    good = [c for c in fed.clients if c != bad]
    np.testing.assert_allclose(out2.theta, theta0 + np.mean([ups2[c] for c in good], axis=0), atol=1e-12)
    rejects = [e["data"] for e in _audit(fed) if e["event"] == "reject"]
    assert rejects and rejects[-1]["client"] == bad
    assert "does not match the commitment" in rejects[-1]["reason"]


def test_test_only_mode_settings_are_validated_by_the_mode(commit_reveal) -> None:
    with pytest.raises(ConfigError, match="federation.clip_norm=20.0: test_commit_reveal"):
        FederationSettings.from_dict({"mode": CommitRevealMode.name, "clip_norm": 20.0})


def test_unknown_mode_and_aggregator_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"federation.mode='nope'.*masking"):
        resolve("nope")
    with pytest.raises(ConfigError, match=r"federation.aggregator='ties'.*sa_hties"):
        resolve("masking", "ties")


def test_masking_rejections_reach_the_audit_log(tmp_path) -> None:
    """A masking message that passes the shape check but fails the protocol (a forged identity
    signature on the advertised keys) is refused; the protocol's reason is audited as ``reject``."""
    s = FederationSettings.from_dict({"rounds": 1, "min_clients": 4, "threshold": 3, "mode": "masking", "dim": DIM})
    fed = InMemoryFederation(tmp_path, s, n=4)
    bad = fed.clients[0]

    def tamper(stage, c, reply):
        if stage == "advertise" and c == bad:
            keys = dict(reply["keys"])
            sig = bytearray(__import__("base64").b64decode(keys["signature"]))
            sig[0] ^= 1
            keys["signature"] = __import__("base64").b64encode(bytes(sig)).decode()
            return {**reply, "keys": keys}
        return reply

    ups = _updates(fed.clients, seed=2)
    out = fed.run_round(ups, tamper=tamper)
    assert out.row.status == "done", out.row.reason
    good = [c for c in fed.clients if c != bad]
    np.testing.assert_allclose(out.theta, np.mean([ups[c] for c in good], axis=0), atol=1e-6)
    rejects = [e["data"] for e in _audit(fed) if e["event"] == "reject"]
    assert [r["client"] for r in rejects] == [bad]
    assert rejects[0]["stage"] == "advertise" and "signature" in rejects[0]["reason"]
    assert "refused by the secure-aggregation protocol" not in rejects[0]["reason"]  # the real reason, not the fallback
