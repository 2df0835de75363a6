"""T08: a client refuses a global state that does not match the signed hash and a round config whose
operator signature is bad, before it trains (malicious-server test double over the real client).

The server is a real round engine (in-process) that signs an honest round config; a test double
in place of the client's HTTP connection serves that config and the global state, or tampered
versions of them, to the real :class:`ClientSession`. Training is the observable: the honest
double reaches ``train_fn`` (sanity), every tampered one is refused with ``SecurityError`` first.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedproxy_secure.artifacts.keys import save_public_key
from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.errors import SecurityError
from fedproxy_secure.protocol.roundcfg import sign_round_config, state_from_bytes, state_to_bytes
from fedproxy_secure.transport.http import Reply
from tests.net_helpers import make_server
from tests.threat_helpers import InProcessFederation


class Trained(Exception):
    """Raised by the test's train_fn: the client got as far as training."""


class MaliciousServer:
    """Stands in for the client's signed HTTP connection: answers join, serves ``config`` and ``state``."""

    def __init__(self, config: dict, state: bytes) -> None:
        self.config, self.state, self.paths = config, state, []

    def post_json(self, path: str, obj, round_id=None) -> Reply:
        self.paths.append(("POST", path))
        return Reply(200, b'{"accepted": true}')

    def get(self, path: str, round_id=None) -> Reply:
        self.paths.append(("GET", path))
        if path.endswith("/config"):
            return Reply(200, json.dumps(self.config).encode())
        if path.startswith("/v1/state/"):
            return Reply(200, self.state)
        return Reply(404, b'{"error": "not served by the double"}')

    def close(self) -> None:
        pass


@pytest.fixture()
def setup(tmp_path):
    """(client session pinned to the federation's operator key, engine, round id, signed config, state)."""
    srv, _ = make_server(tmp_path, 1)
    fed = InProcessFederation(tmp_path / "fed", n=2, dim=8)
    enrol = srv / "enrol" / "site0"
    (enrol / "operator.pub").unlink()
    save_public_key(fed.op.public_key(), enrol / "operator.pub")
    s = ClientSession(enrol, tmp_path / "client", retry_s=1)
    cid = fed.add_client("site0", s.key)
    s.client_id = cid
    rid, cfg = fed.join_all()
    state = fed.store.global_state(cfg["state_round"])[1]
    yield s, fed, rid, cfg, state
    s.close()


def _run(s: ClientSession, rid: int, config: dict, state: bytes) -> list:
    """Run the round against the double; returns the thetas train_fn saw (raises what the client raises)."""
    seen: list = []

    def train_fn(theta, cfg):
        seen.append(theta)
        raise Trained()

    s.http = MaliciousServer(config, state)
    with pytest.raises(Trained):
        s.run_round(rid, train_fn)
    return seen


def _refused(s: ClientSession, rid: int, config: dict, state: bytes, match: str) -> None:
    called: list = []
    s.http = MaliciousServer(config, state)
    with pytest.raises(SecurityError, match=match):
        s.run_round(rid, lambda theta, cfg: called.append(1) or (np.zeros(8), {}))
    assert called == [], "the client trained before refusing"


def test_honest_config_and_state_reach_training(setup):
    s, _, rid, cfg, state = setup
    seen = _run(s, rid, cfg, state)
    np.testing.assert_array_equal(seen[0], state_from_bytes(state)["theta"])


def test_wrong_global_state_hash_is_refused(setup):
    """Model inconsistency: the config is honestly signed, the state served to this client is another."""
    s, _, rid, cfg, state = setup
    theta = state_from_bytes(state)["theta"].copy()
    theta[0] += 1e-3  # a crafted model for this client only
    crafted = state_to_bytes(theta)
    assert hashlib.sha256(crafted).hexdigest() != cfg["state_sha256"]
    _refused(s, rid, cfg, crafted, "does not match the signed hash")
    _refused(s, rid, cfg, state + b"\0", "does not match the signed hash")


def test_state_hash_swapped_in_the_config_without_the_operator_key_is_refused(setup):
    s, _, rid, cfg, state = setup
    theta = state_from_bytes(state)["theta"].copy()
    theta[:] = 0.5
    crafted = state_to_bytes(theta)
    forged = {**cfg, "state_sha256": hashlib.sha256(crafted).hexdigest()}  # signature left as it was
    _refused(s, rid, forged, crafted, "signature does not verify")


def test_bad_round_config_signatures_are_refused(setup):
    s, fed, rid, cfg, state = setup
    sig = bytearray(base64.b64decode(cfg["signature"]))
    sig[0] ^= 1
    flipped = {**cfg, "signature": base64.b64encode(bytes(sig)).decode()}
    _refused(s, rid, flipped, state, "does not verify")
    unsigned = {k: v for k, v in cfg.items() if k != "signature"}
    _refused(s, rid, unsigned, state, "not signed")
    body = {k: v for k, v in cfg.items() if k not in ("signature", "kid")}
    other_key = sign_round_config(Ed25519PrivateKey.generate(), body)  # a key the client does not pin
    _refused(s, rid, other_key, state, "unknown key")
    # the pinned key id with another key's signature
    impostor = {**other_key, "kid": cfg["kid"]}
    _refused(s, rid, impostor, state, "does not verify")
    garbage = {**cfg, "signature": "%%%not-base64%%%"}
    _refused(s, rid, garbage, state, "base64|does not verify")


def test_config_signed_for_another_round_is_refused(setup):
    """A validly signed config of another round (replayed) is refused too."""
    s, fed, rid, cfg, state = setup
    body = copy.deepcopy({k: v for k, v in cfg.items() if k not in ("signature", "kid")})
    body["round_id"] = rid + 1
    _refused(s, rid, sign_round_config(fed.op, body), state, "does not list us|round")
