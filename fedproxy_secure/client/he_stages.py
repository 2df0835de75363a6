"""Client side of HE (CKKS) secure aggregation as network stages (mirror of ``server/he_stages``).

Every client checks the key holder's public descriptor against the key holder's enrolled identity
(listed in the operator-signed round config) before encrypting under it, so a server cannot
substitute a context whose secret key it knows. The round's key holder makes a fresh CKKS key set
in memory (never written to disk, never sent), and before decrypting checks: the server's signed
contribution statement (pinned statement key from the signed config; session; key set; >= t
enrolled contributors), that every listed contributor signed its envelope digest with its
enrolled identity, that its own envelope is listed unchanged, and (``verify_aggregate``) that the
aggregate is exactly the sum of those envelopes, recomputed locally. Then it floods and rounds.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.server.he_stages import (DESCRIPTOR_MAX, HE_STAGES, INPUT_DOMAIN, KEYS_DOMAIN, STATEMENT_MAX,
                                              HERound, b64d, b64e, parse_statement, signed_payload)
from fedproxy_secure.server.protocols import vec_to_b64


def _fields(msg: object, want: str, fields: set[str]) -> dict:
    if not isinstance(msg, dict) or msg.get("type") != want or set(msg) != fields:
        got = msg.get("type") if isinstance(msg, dict) else type(msg).__name__
        raise ProtocolAbort(f"HE: expected the server's {want} message, got {got!r}")
    return msg


class HEClientStages:
    """One client's part in one HE round (key holder or not)."""

    stages = HE_STAGES

    def __init__(self, vector: np.ndarray, *, sid: int, session_id: bytes, threshold: int, dim: int,
                 clip_norm: float, cohort: list[int], options: dict, identity_key=None,
                 used_sessions: set | None = None) -> None:
        from fedproxy_secure.secagg.he import KeyHolder

        if identity_key is None:
            raise ConfigError("HE over the network needs the client's enrolled identity key")
        self.r = HERound.from_options(options)
        if int(threshold) < 2:
            raise ProtocolAbort(f"HE: threshold {threshold} < 2 would let the key holder decrypt a single update")
        if self.r.key_holder not in set(cohort) or sid not in set(cohort):
            raise ProtocolAbort("HE: the key holder or this client is not in the signed cohort")
        self.v = np.asarray(vector, dtype=np.float64).ravel()
        if self.v.size != int(dim):
            raise ConfigError(f"HE: update has {self.v.size} values, the round expects {dim}")
        self.sid, self.session_id, self.threshold, self.dim = int(sid), bytes(session_id), int(threshold), int(dim)
        self.clip, self.cohort, self.key = float(clip_norm), frozenset(int(c) for c in cohort), identity_key
        if used_sessions is not None:
            if self.session_id in used_sessions:
                raise ProtocolAbort("HE: session id already used: refusing (replay)")
            used_sessions.add(self.session_id)
        self.is_key_holder = self.sid == self.r.key_holder
        # fresh keys for this round only, held in memory; the statement key is pinned from the signed config
        self.keyholder = KeyHolder(self.r.params, flooding=self.r.flooding,
                                   server_public_key=self.r.statement_key) if self.is_key_holder else None
        self.descriptor: bytes | None = None
        self.envelope_sha256: str | None = None

    def _sign(self, domain: bytes, blob: bytes) -> str:
        from fedproxy_secure.artifacts.keys import sign

        return b64e(sign(self.key, domain, signed_payload(self.session_id, self.sid, blob)))

    def step(self, stage: str, server_msg: dict) -> dict:
        """Check the server's message for ``stage`` and return ours (``ProtocolAbort``/``SecurityError``)."""
        if stage == "he_keys":
            if self.keyholder is None:
                return {"type": "he_ready", "sid": self.sid}
            desc = self.keyholder.public_descriptor()
            return {"type": "he_keys", "sid": self.sid, "descriptor": b64e(desc), "signature": self._sign(KEYS_DOMAIN, desc)}
        if stage == "he_input":
            return self._input(server_msg)
        if stage == "he_decrypt":
            if self.keyholder is None:
                _fields(server_msg, "he_wait", {"type"})
                return {"type": "he_done", "sid": self.sid}
            return self._decrypt(server_msg)
        raise ProtocolAbort(f"HE: unknown stage {stage!r}")

    def _input(self, msg: dict) -> dict:
        from fedproxy_secure.secagg.he import ClientEncryptor

        m = _fields(msg, "he_context", {"type", "key_holder", "descriptor", "signature"})
        if m["key_holder"] != self.r.key_holder:
            raise SecurityError(f"HE: the server names key holder {m['key_holder']!r}, the signed config says "
                                f"{self.r.key_holder}")
        desc = b64d(m["descriptor"], "HE descriptor", DESCRIPTOR_MAX)
        self.r.verify_identity(KEYS_DOMAIN, self.session_id, self.r.key_holder, desc, m["signature"], "HE descriptor")
        if self.keyholder is not None and not hmac.compare_digest(desc, self.keyholder.public_descriptor()):
            raise SecurityError("HE: the server relayed another descriptor than the one this key holder published")
        enc = ClientEncryptor(desc, clip=self.clip)  # SecurityError if it carries a secret key
        if enc.params != self.r.params:
            raise SecurityError("HE: the descriptor's CKKS parameters differ from the signed round config")
        self.descriptor = desc
        env = enc.encrypt(self.v, session_id=self.session_id, client_id=self.sid)
        self.envelope_sha256 = hashlib.sha256(env).hexdigest()
        return {"type": "he_input", "sid": self.sid, "envelope": b64e(env), "signature": self._sign(INPUT_DOMAIN, env)}

    def _decrypt(self, msg: dict) -> dict:
        from fedproxy_secure.secagg.he import ServerAggregatorHE

        m = _fields(msg, "he_aggregate", {"type", "aggregate", "statement", "statement_signature", "contributions"})
        max_env = self.r.envelope_max(self.dim)
        agg = b64d(m["aggregate"], "HE aggregate", max_env)
        statement = b64d(m["statement"], "HE statement", STATEMENT_MAX)
        st_sig = b64d(m["statement_signature"], "HE statement signature", 64)
        st = parse_statement(statement)  # the signature itself is checked in decrypt_aggregate
        digests, contribs = st["contribution_sha256"], m["contributions"]
        listed = st.get("contributors")
        if not isinstance(contribs, dict) or set(contribs) != set(digests) or not isinstance(listed, list) \
                or sorted(str(c) for c in listed) != sorted(digests):
            raise SecurityError("HE: the contributions sent differ from those in the statement")
        if not hmac.compare_digest(str(digests.get(str(self.sid), "")), self.envelope_sha256 or "-"):
            raise SecurityError("HE: this key holder's own envelope is missing or altered in the statement")
        envs: dict[int, bytes] = {}
        for k, c in sorted(contribs.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
            if not k.isdigit() or int(k) not in self.cohort or not isinstance(c, dict):
                raise SecurityError(f"HE: contributor {k!r} is not in the signed cohort")
            cid, digest = int(k), str(digests[k])
            try:
                raw_digest = bytes.fromhex(digest)
            except ValueError:
                raise SecurityError(f"HE: statement digest of contributor {cid} is not hex") from None
            from fedproxy_secure.artifacts.keys import verify_signature

            pub = self.r.identities.get(cid)
            sig = b64d(c.get("signature"), f"HE contribution {cid} signature", 64)
            payload = self.session_id + cid.to_bytes(8, "big") + raw_digest
            if pub is None or len(raw_digest) != 32 or not verify_signature(pub, sig, INPUT_DOMAIN, payload):
                raise SecurityError(f"HE: contributor {cid} did not sign the envelope the statement lists for it")
            if self.r.verify_aggregate:
                env = b64d(c.get("envelope"), f"HE contribution {cid}", max_env)
                if not hmac.compare_digest(hashlib.sha256(env).hexdigest(), digest):
                    raise SecurityError(f"HE: envelope of contributor {cid} does not match its signed digest")
                envs[cid] = env
        if self.r.verify_aggregate:  # recompute the sum: the aggregate must be exactly these envelopes
            mine = ServerAggregatorHE(self.descriptor)
            mine.start_round(self.session_id, self.dim)
            for cid in sorted(envs):
                mine.submit(cid, envs[cid])
            again, _, _ = mine.finish(self.threshold)
            if not hmac.compare_digest(hashlib.sha256(again).digest(), hashlib.sha256(agg).digest()):
                raise SecurityError("HE: the aggregate is not the sum of the signed contributions; refusing to decrypt")
        plain = self.keyholder.decrypt_aggregate(agg, statement, st_sig, session_id=self.session_id,
                                                 threshold=self.threshold, enrolled=self.cohort)
        return {"type": "he_plain", "sid": self.sid, "sum": vec_to_b64(plain),
                "aggregate_sha256": hashlib.sha256(agg).hexdigest()}
