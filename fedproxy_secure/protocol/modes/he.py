"""Mode ``he``: CKKS homomorphic secure aggregation over :mod:`fedproxy_secure.secagg.he`.

Three stages after ``join`` (client -> server message; the server's message for the next stage):

``he_keys``    the round's key holder posts ``he_keys`` {descriptor, signature}: a *fresh* CKKS
               public descriptor (no secret key) signed with its enrolled Ed25519 identity; the
               others post ``he_ready``. -> every client gets ``he_context``, which it checks
               against the operator-signed identities.
``he_input``   every client posts ``he_input`` {envelope, signature}. -> the key holder gets
               ``he_aggregate`` (summed ciphertext, the server's signed contribution statement, each
               contributor's signed digest and, with ``verify_aggregate``, the envelopes); the
               others get ``he_wait``.
``he_decrypt`` the key holder checks all of it, decrypts, floods and rounds, and posts
               ``he_plain`` {sum}; the others post ``he_done``.

The key holder of round ``r`` is secagg id ``((r - 1) mod n) + 1`` (rotating), named in the signed
round config with the server's statement-signing public key and the CKKS parameters. The server
holds only public descriptors and ciphertexts; ``close`` is deterministic (replayable). Messages,
settings and shared checks: :mod:`fedproxy_secure.protocol.he_wire`.

Client side: every client checks the key holder's descriptor against the key holder's enrolled
identity before encrypting under it; the key holder checks the server's signed contribution
statement, every contributor's signature and (``verify_aggregate``) recomputes the aggregate
before it decrypts.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.wire.codec import b64d, b64e, vec_from_b64, vec_to_b64
from fedproxy_secure.protocol.he_wire import (DESCRIPTOR_MAX, HE_STAGES, INPUT_DOMAIN, KEYS_DOMAIN, STATEMENT_MAX,
                                              HERound, check_shape, he_settings, key_holder_for, parse_statement,
                                              signed_digest_payload, signed_payload)
from fedproxy_secure.protocol.modes.base import ClientStages, Mode, RoundContext, ServerStages

# ----------------------------------------------------------------------------- server


class HEServerStages:
    """Server side of an HE session as network stages. Holds no CKKS secret key, ever."""

    stages = HE_STAGES

    def __init__(self, *, cohort: list[int], dim: int, threshold: int, session_id: bytes, clip_norm: float,
                 options: dict, signing_key=None, context: bytes = b"") -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if signing_key is None:
            raise ConfigError("HE mode: the server needs its statement signing key (keys/he_statement.key)")
        self.r = HERound.from_options(options)
        pub = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if not hmac.compare_digest(pub, self.r.statement_key):
            raise ConfigError("HE mode: the statement key in the round config is not this server's key")
        self.cohort, self.dim, self.threshold = set(cohort), int(dim), int(threshold)
        self.session_id, self.clip = bytes(session_id), float(clip_norm)
        if self.r.key_holder not in self.cohort:
            raise ProtocolAbort(f"HE: key holder {self.r.key_holder} is not in the cohort")
        self._key = signing_key
        self.context = bytes(context)
        self.agg = None          # ServerAggregatorHE once the key holder's descriptor is accepted
        self._scratch = None     # a second aggregator for checking envelopes on arrival (no state kept)
        self._context_msg: dict | None = None
        self._decrypt_in: tuple[bytes, bytes, bytes] | None = None
        self._contributors: tuple[int, ...] = ()
        self._sum: np.ndarray | None = None
        self.rejections: dict[int, str] = {}

    # -- per-message checks ---------------------------------------------------------------
    def _expected(self, stage: str, sid: int) -> str:
        kh = sid == self.r.key_holder
        if stage == "he_keys":
            return "he_keys" if kh else "he_ready"
        if stage == "he_input":
            return "he_input"
        if stage == "he_decrypt":
            return "he_plain" if kh else "he_done"
        raise ProtocolAbort(f"unknown HE stage {stage!r}")

    def _accept_descriptor(self, msg: dict):
        from fedproxy_secure.secagg.he import ServerAggregatorHE

        desc = b64d(msg["descriptor"], "he_keys descriptor", DESCRIPTOR_MAX)
        self.r.verify_identity(KEYS_DOMAIN, self.session_id, self.r.key_holder, desc, msg["signature"],
                               "he_keys descriptor", self.context)
        agg = ServerAggregatorHE(desc, signing_key=self._key)  # SecurityError if it carries a secret key
        if agg.params != self.r.params:
            raise SecurityError("he_keys: the descriptor's CKKS parameters differ from the signed round config")
        if agg.has_secret_key:  # parse() already refuses it; checked again where it matters
            raise SecurityError("he_keys: descriptor carries a secret key")
        return agg

    def _envelope(self, sid: int, msg: dict) -> bytes:
        env = b64d(msg["envelope"], f"he_input of client {sid}", self.r.envelope_max(self.dim))
        self.r.verify_identity(INPUT_DOMAIN, self.session_id, sid, env, msg["signature"], f"he_input of client {sid}",
                               self.context)
        return env

    def _plain(self, msg: dict) -> np.ndarray:
        if self._decrypt_in is None:
            raise ProtocolAbort("he_plain before the aggregate was sent")
        digest = hashlib.sha256(self._decrypt_in[0]).hexdigest()
        if not isinstance(msg["aggregate_sha256"], str) or not hmac.compare_digest(msg["aggregate_sha256"], digest):
            raise ProtocolAbort("he_plain: decrypts another aggregate than the one this round sent")
        return vec_from_b64(msg["sum"], self.dim)

    def validate(self, stage: str, msg: dict, sid: int) -> None:
        """Check one client message on arrival, before it is stored (``ProtocolAbort``/``SecurityError``).

        Envelopes get the full check (identity signature, fingerprint, session, client id,
        length, every ciphertext parsed under the public context) without touching the sum.
        """
        try:
            kind = self._expected(stage, sid)
            check_shape(msg, kind, sid)
            if kind == "he_keys":
                self._accept_descriptor(msg)
            elif kind == "he_input":
                if self._scratch is None:
                    raise ProtocolAbort("he_input before the public context was published")
                env = self._envelope(sid, msg)
                self._scratch.start_round(self.session_id, self.dim)
                self._scratch.submit(sid, env)
            elif kind == "he_plain":
                self._plain(msg)
        except ConfigError as exc:
            raise ProtocolAbort(str(exc)) from None

    # -- stage closing (deterministic) --------------------------------------------------------
    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Close ``stage`` with the survivors' messages; the next stage's message per client or None."""
        kh = self.r.key_holder
        if stage == "he_keys":
            ok = []
            for sid in sorted(inputs):
                try:
                    check_shape(inputs[sid], self._expected(stage, sid), sid)
                    ok.append(sid)
                except ProtocolAbort as exc:
                    self.rejections[sid] = str(exc)
            if kh not in ok:
                why = self.rejections.get(kh, "it sent nothing by the deadline")
                raise ProtocolAbort(f"HE key holder (secagg id {kh}) did not publish its public context ({why}): "
                                    "round aborted before any update was encrypted")
            m = inputs[kh]
            try:
                self.agg = self._accept_descriptor(m)
                self._scratch = self._accept_descriptor(m)
            except (SecurityError, ConfigError) as exc:
                raise ProtocolAbort(f"HE key holder (secagg id {kh}) published an unusable context: {exc}") from None
            self.agg.start_round(self.session_id, self.dim)
            self._context_msg = {"type": "he_context", "key_holder": kh, "descriptor": m["descriptor"],
                                 "signature": m["signature"]}
            return {sid: dict(self._context_msg) for sid in ok}
        if stage == "he_input":
            if self.agg is None:
                raise ProtocolAbort("he_input closed before the public context was accepted")
            signed: dict[int, dict] = {}
            for sid in sorted(inputs):
                try:
                    msg = check_shape(inputs[sid], "he_input", sid)
                    self.agg.submit(sid, self._envelope(sid, msg))
                    signed[sid] = {"signature": msg["signature"]}
                    if self.r.verify_aggregate:
                        signed[sid]["envelope"] = msg["envelope"]
                except (SecurityError, ConfigError) as exc:
                    self.rejections[sid] = str(exc)
            if kh not in signed:
                why = self.rejections.get(kh, "it sent nothing by the deadline")
                raise ProtocolAbort(f"HE key holder (secagg id {kh}) has no accepted he_input ({why}): round aborted, "
                                    "nothing was decrypted")
            agg, statement, sig = self.agg.finish(self.threshold)  # ProtocolAbort below threshold
            self._decrypt_in = (agg, statement, sig)
            self._contributors = tuple(sorted(signed))
            out = {sid: {"type": "he_wait"} for sid in signed if sid != kh}
            out[kh] = {"type": "he_aggregate", "aggregate": b64e(agg), "statement": b64e(statement),
                       "statement_signature": b64e(sig), "contributions": {str(k): v for k, v in signed.items()}}
            return out
        if stage == "he_decrypt":
            if kh not in inputs:
                raise ProtocolAbort(f"HE key holder (secagg id {kh}) dropped before returning the decrypted sum: "
                                    "round aborted; the server holds only ciphertexts")
            try:
                self._sum = self._plain(check_shape(inputs[kh], "he_plain", kh))
            except ProtocolAbort as exc:
                raise ProtocolAbort(f"HE key holder (secagg id {kh}): {exc}") from None
            return None
        raise ProtocolAbort(f"unknown HE stage {stage!r}")

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """The key holder's flooded plaintext sum over the contributors, and the contributors."""
        if self._sum is None:
            raise ProtocolAbort("HE: no decrypted sum")
        return self._sum, self._contributors

    def result_info(self) -> dict:
        """Public facts of the round for the stored result (no key material)."""
        n = len(self._contributors)
        stmt = self._decrypt_in[1] if self._decrypt_in else b""
        return {"key_holder_sid": self.r.key_holder, "contributors_sid": list(self._contributors),
                "context_sha256": self.agg.public.fingerprint.hex() if self.agg else None,
                "statement_sha256": hashlib.sha256(stmt).hexdigest(),
                "stated_tolerance": self.r.flooding.tolerance(self.r.params, n) if n else None,
                "flood_sigma": self.r.flooding.sigma(self.r.params, n) if n else None}

    @property
    def holds_secret_key(self) -> bool:
        """True iff any server-side CKKS context holds a secret key (never, by construction)."""
        return any(a is not None and a.has_secret_key for a in (self.agg, self._scratch))



# ----------------------------------------------------------------------------- client

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
                 used_sessions: set | None = None, context: bytes = b"") -> None:
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
        self.context = bytes(context)
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

        return b64e(sign(self.key, domain, signed_payload(self.session_id, self.sid, blob, self.context)))

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
        self.r.verify_identity(KEYS_DOMAIN, self.session_id, self.r.key_holder, desc, m["signature"], "HE descriptor",
                               self.context)
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
            payload = signed_digest_payload(self.session_id, cid, raw_digest, self.context)
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


class HEMode(Mode):
    """CKKS secure aggregation with a rotating client key holder."""

    name = "he"
    base_stages = HE_STAGES
    settings_section = "he"

    def validate_settings(self, s) -> None:
        """``federation.he`` must be valid CKKS options that fit ``clip_norm`` (``ConfigError`` naming the field)."""
        he_settings(s.he, s.clip_norm)

    def check_server(self, he_key) -> None:
        """The server needs its HE statement key."""
        if he_key is None:
            raise ConfigError("federation.mode he: the server needs its HE statement key (keys/he_statement.key)")

    def round_options(self, s, round_id: int, n: int, session_id: bytes, he_key) -> dict:
        """``secagg_options.he``: CKKS parameters, the round's key holder and the statement key."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        he = he_settings(s.he, s.clip_norm)
        if n > he["max_clients"]:
            raise ProtocolAbort(f"cohort of {n} exceeds federation.he.max_clients={he['max_clients']}")
        pub = he_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        he.update(key_holder=key_holder_for(round_id, n), statement_key=b64e(pub))
        return {"secagg_options": {"he": he}}

    def server_stages(self, ctx: RoundContext) -> ServerStages:
        """HE server stages (the statement key signs contribution statements)."""
        return HEServerStages(cohort=ctx.cohort, dim=ctx.dim, threshold=int(ctx.config["threshold"]),
                              session_id=ctx.session_id, clip_norm=ctx.clip_norm,
                              options=ctx.config.get("secagg_options", {}), signing_key=ctx.he_key,
                              context=ctx.context_digest)

    def client_stages(self, cfg: dict, vector: np.ndarray, sid: int, *, identity_key=None,
                      used_sessions: set | None = None, operator=None, context: bytes | None = None,
                      graph_nonce: bytes | None = None) -> ClientStages:
        """HE client stages for a verified round config (``context``: default its digest)."""
        from fedproxy_secure.wire.binding import round_config_digest

        return HEClientStages(vector, sid=sid, session_id=bytes.fromhex(cfg["session_id"]), threshold=cfg["threshold"],
                              dim=cfg["dim"], clip_norm=cfg["clip_norm"], cohort=[i for _, i in cfg["cohort"]],
                              options=cfg.get("secagg_options", {}), identity_key=identity_key,
                              used_sessions=used_sessions,
                              context=round_config_digest(cfg) if context is None else context)

    def result_info(self, proto: ServerStages, names: dict[int, str]) -> dict:
        """Key holder, contributors, context and statement digests, stated tolerance (no key material)."""
        info = proto.result_info()
        info["key_holder"] = names.get(info["key_holder_sid"])
        return info
