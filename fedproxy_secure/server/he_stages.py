"""Network stages of HE (CKKS) secure aggregation over :mod:`fedproxy_secure.secagg.he`.

Three stages after ``join`` (client -> server message; the server's message for the next stage):

``he_keys``    the round's key holder posts ``he_keys`` {descriptor, signature}: a *fresh* CKKS
               public descriptor (no secret key) signed with its enrolled Ed25519 identity; the
               others post ``he_ready``. -> every client gets ``he_context`` (descriptor + the key
               holder's signature), which it checks against the operator-signed identities.
``he_input``   every client posts ``he_input`` {envelope, signature}: its CKKS envelope, bound to
               the descriptor's fingerprint and the session, and its identity signature over the
               envelope digest. -> the key holder gets ``he_aggregate`` (summed ciphertext, the
               server's signed contribution statement, each contributor's signed digest and, with
               ``verify_aggregate``, the envelopes themselves); the others get ``he_wait``.
``he_decrypt`` the key holder checks all of it, decrypts, floods and rounds, and posts
               ``he_plain`` {sum}; the others post ``he_done``.

The key holder of round ``r`` is secagg id ``((r - 1) mod n) + 1`` of the cohort (rotating), named
in the operator-signed round config together with the server's statement-signing public key and
the CKKS parameters; its keys live only in its memory for that one round. The server holds only
public descriptors and ciphertexts. ``close`` is deterministic in its inputs (ciphertext addition
and Ed25519 signatures are deterministic), so a restarted server replays the stored messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from dataclasses import dataclass

import numpy as np

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.server.protocols import vec_from_b64

HE_STAGES = ("he_keys", "he_input", "he_decrypt")
KEYS_DOMAIN = b"fedproxy-secure/v1/he-keys\n"
INPUT_DOMAIN = b"fedproxy-secure/v1/he-input\n"
#: a public descriptor is ~235 KB for N = 8192 (no relinearisation/Galois keys); refuse beyond this
DESCRIPTOR_MAX = 4 << 20
STATEMENT_MAX = 1 << 20
MIN_STAT_SECURITY = 30
OPTION_KEYS = {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "encryption", "flood",
               "stat_security", "max_decryptions", "verify_aggregate", "max_clients"}
MESSAGE_FIELDS = {
    "he_keys": {"type", "sid", "descriptor", "signature"},
    "he_ready": {"type", "sid"},
    "he_input": {"type", "sid", "envelope", "signature"},
    "he_plain": {"type", "sid", "sum", "aggregate_sha256"},
    "he_done": {"type", "sid"},
}


# ----------------------------------------------------------------------------- settings


def he_settings(opts: dict | None, clip_norm: float) -> dict:
    """Validated, normalised ``federation.he`` options (``ConfigError`` naming the field).

    Over the network only public-key encryption and noise flooding are allowed: ``symmetric``
    would put the secret key on every client, and decrypting without flooding leaks the key
    (IND-CPA-D, eprint 2020/1533). ``max_clients`` bounds the cohort for the capacity check
    (``clip_norm x max_clients`` must fit the CKKS headroom).
    """
    from fedproxy_secure.secagg.he_params import check_capacity, validate_params

    o = dict(opts or {})
    unknown = set(o) - OPTION_KEYS
    if unknown:
        raise ConfigError(f"federation.he: unknown keys {sorted(unknown)}; allowed: {sorted(OPTION_KEYS)}")
    if o.get("encryption", "public") != "public":
        raise ConfigError("federation.he.encryption: only 'public' over the network ('symmetric' puts the CKKS "
                          "secret key on every client)")
    if o.get("flood", True) is not True:
        raise ConfigError("federation.he.flood: noise flooding cannot be turned off over the network (decrypted "
                          "aggregates would leak the CKKS secret key, eprint 2020/1533)")
    params = validate_params(o.get("poly_modulus_degree", 8192), tuple(o.get("coeff_mod_bit_sizes", (60, 40))),
                             o.get("scale_bits", 40), "public")
    stat, maxd, maxc = (int(o.get("stat_security", MIN_STAT_SECURITY)), int(o.get("max_decryptions", 100)),
                        int(o.get("max_clients", 1024)))
    if stat < MIN_STAT_SECURITY:
        raise ConfigError(f"federation.he.stat_security={stat}: must be >= {MIN_STAT_SECURITY}")
    if maxd < 1 or maxc < 2:
        raise ConfigError("federation.he.max_decryptions must be >= 1 and federation.he.max_clients >= 2")
    check_capacity(params, float(clip_norm), maxc, math.inf)
    return {"params": params.to_json(), "stat_security": stat, "max_decryptions": maxd,
            "verify_aggregate": bool(o.get("verify_aggregate", True)), "max_clients": maxc}


def key_holder_for(round_id: int, n: int) -> int:
    """Secagg id of round ``round_id``'s key holder in a cohort of ``n`` (rotates over the cohort)."""
    return (int(round_id) - 1) % int(n) + 1


def b64e(b: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(bytes(b)).decode()


def b64d(s: object, what: str, max_bytes: int) -> bytes:
    """Decode base64 text of at most ``max_bytes`` bytes; the length is checked *before* decoding."""
    if not isinstance(s, str):
        raise ProtocolAbort(f"{what}: expected a base64 string")
    if len(s) > 4 * ((max_bytes + 2) // 3):
        raise ProtocolAbort(f"{what}: {len(s)} base64 characters exceed the {max_bytes}-byte limit")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise ProtocolAbort(f"{what}: invalid base64") from None


def signed_payload(session_id: bytes, sid: int, blob: bytes) -> bytes:
    """What a client signs for a descriptor or envelope: session id, secagg id, SHA-256 of the blob."""
    return bytes(session_id) + int(sid).to_bytes(8, "big") + hashlib.sha256(blob).digest()


def check_shape(msg: object, want: str, sid: int) -> dict:
    """``msg`` must be a dict of type ``want`` with exactly its fields, sent by secagg id ``sid``."""
    if not isinstance(msg, dict) or msg.get("type") != want:
        got = msg.get("type") if isinstance(msg, dict) else type(msg).__name__
        raise ProtocolAbort(f"expected a {want} message, got {got!r}")
    if set(msg) != MESSAGE_FIELDS[want]:
        raise ProtocolAbort(f"{want}: fields {sorted(msg)}, expected {sorted(MESSAGE_FIELDS[want])}")
    if msg["sid"] != sid or isinstance(msg["sid"], bool):
        raise ProtocolAbort(f"{want}: claims secagg id {msg['sid']!r}, the sender is {sid}")
    return msg


@dataclass(frozen=True)
class HERound:
    """The HE parameters of one round, as read from the operator-signed round config."""

    params: object  # CKKSParams
    flooding: object  # FloodingPolicy
    key_holder: int
    statement_key: bytes
    verify_aggregate: bool
    identities: dict

    @classmethod
    def from_options(cls, options: dict) -> "HERound":
        """Parse ``secagg_options`` (``he`` and ``identities``); ``ProtocolAbort`` if anything is off."""
        from fedproxy_secure.secagg.he import FloodingPolicy
        from fedproxy_secure.secagg.he_params import validate_params
        from fedproxy_secure.server.masking_stages import identities

        he = (options or {}).get("he")
        if not isinstance(he, dict):
            raise ProtocolAbort("round config: HE mode without secagg_options.he")
        try:
            p = he["params"]
            params = validate_params(p["poly_modulus_degree"], tuple(p["coeff_mod_bit_sizes"]), p["scale_bits"],
                                     p["encryption"])
            flooding = FloodingPolicy(int(he["stat_security"]), int(he["max_decryptions"]), True)
            kh, skey = int(he["key_holder"]), base64.b64decode(he["statement_key"], validate=True)
            ids = identities(options)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ProtocolAbort(f"round config: bad secagg_options.he ({exc})") from None
        if params.encryption != "public" or flooding.stat_security < MIN_STAT_SECURITY:
            raise ProtocolAbort("round config: HE over the network needs public-key encryption and "
                                f"stat_security >= {MIN_STAT_SECURITY}")
        if len(skey) != 32 or not ids or kh not in ids:
            raise ProtocolAbort("round config: HE needs the statement key and the identity of every cohort member, "
                                "key holder included")
        return cls(params, flooding, kh, skey, bool(he.get("verify_aggregate", True)), ids)

    def envelope_max(self, dim: int) -> int:
        """Largest envelope (bytes) for ``dim`` values: one ciphertext per ``slots`` values + header."""
        chunks = -(-int(dim) // self.params.slots)
        return chunks * (self.params.max_ciphertext_bytes + 64) + 4096

    def verify_identity(self, domain: bytes, session_id: bytes, sid: int, blob: bytes, sig_b64: object,
                        what: str) -> None:
        """``SecurityError`` unless ``sig_b64`` is secagg id ``sid``'s identity signature over ``blob``."""
        from fedproxy_secure.artifacts.keys import verify_signature

        pub = self.identities.get(int(sid))
        sig = b64d(sig_b64, f"{what} signature", 64)
        if pub is None or not verify_signature(pub, sig, domain, signed_payload(session_id, sid, blob)):
            raise SecurityError(f"{what}: the signature does not verify under secagg id {sid}'s enrolled identity")


# ----------------------------------------------------------------------------- server


class HEServerStages:
    """Server side of an HE session as network stages. Holds no CKKS secret key, ever."""

    stages = HE_STAGES

    def __init__(self, *, cohort: list[int], dim: int, threshold: int, session_id: bytes, clip_norm: float,
                 options: dict, signing_key=None) -> None:
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
                               "he_keys descriptor")
        agg = ServerAggregatorHE(desc, signing_key=self._key)  # SecurityError if it carries a secret key
        if agg.params != self.r.params:
            raise SecurityError("he_keys: the descriptor's CKKS parameters differ from the signed round config")
        if agg.has_secret_key:  # parse() already refuses it; checked again where it matters
            raise SecurityError("he_keys: descriptor carries a secret key")
        return agg

    def _envelope(self, sid: int, msg: dict) -> bytes:
        env = b64d(msg["envelope"], f"he_input of client {sid}", self.r.envelope_max(self.dim))
        self.r.verify_identity(INPUT_DOMAIN, self.session_id, sid, env, msg["signature"], f"he_input of client {sid}")
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


def parse_statement(blob: bytes) -> dict:
    """The server's contribution statement as JSON (bounded size); ``SecurityError`` if malformed."""
    if len(blob) > STATEMENT_MAX:
        raise SecurityError("HE statement: too large")
    try:
        st = json.loads(blob)
        if not isinstance(st, dict) or not isinstance(st.get("contribution_sha256"), dict):
            raise ValueError("not an object with contribution_sha256")
        return st
    except ValueError as exc:
        raise SecurityError(f"HE statement: malformed ({exc})") from None
