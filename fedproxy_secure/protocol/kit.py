"""The site-kit format both parties share: the kit's file set and the ``client.yaml`` it carries.

The server writes kits (``server/kit.py``), the site unpacks them (``client/kit.py``); the format
lives here so neither party imports the other.
"""

from __future__ import annotations

import json

__all__ = ["KIT_FILES", "SECRET_FILES", "MAX_KIT_FILE", "DATA_PLACEHOLDER", "render_client_yaml", "enrol_url_for"]

#: every file a kit may hold, and which of them are secrets (written 0600). No private key: the site makes
#: its TLS key and identity key at first join and enrols with a CSR (``server/enrol_csr.py``).
KIT_FILES = ("ca.pem", "token", "operator.pub", "keyset.json", "server.json", "policy.json", "client.yaml")
SECRET_FILES = ("token",)


def enrol_url_for(url: str, enrol_port: int | None = None) -> str:
    """The CSR enrolment listener's URL for federation ``url``: same scheme and host, port ``enrol_port``
    (default: the federation port + 1, what ``server start`` opens)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    port = enrol_port if enrol_port is not None else (u.port or 443) + 1
    host = f"[{u.hostname}]" if u.hostname and ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}:{port}"
MAX_KIT_FILE = 1 << 20
DATA_PLACEHOLDER = "REPLACE-WITH-YOUR-DATA.jsonl"


def _yaml_scalar(v) -> str:
    """``v`` as a YAML 1.1 scalar PyYAML reads back with the same type (``1e-05`` would be a string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        mant, _, exp = text.partition("e")
        return (mant if "." in mant else mant + ".0") + (f"e{exp}" if exp else "")
    return json.dumps(v)


def render_client_yaml(*, data: str, dp: dict, threads: int = 1, seed: int = 0) -> str:
    """A commented ``client.yaml`` for a site folder made from a kit (paths relative to that folder).

    Guarantees: the text parses to a mapping that :class:`~fedproxy_secure.client.join_config.ClientJoinConfig`
    accepts once ``data`` names an existing file.
    """
    dp_line = "{" + ", ".join(f"{k}: {_yaml_scalar(dp[k])}" for k in ("enabled", "epsilon", "delta", "max_grad_norm")
                              if k in dp) + "}"
    return (
        "# client.yaml of this site (fedproxy-secure client join --config client.yaml); paths are relative to\n"
        "# this folder. Made from the site kit; edit dp and threads to your own policy.\n"
        "enrolment: .              # this folder: ca.pem, token, operator.pub, server.json; client.key/.pem made at first join\n"
        "state_dir: state          # made at first join: the site's own identity key, privacy budget, anti-rollback\n"
        "trainer: lora             # LoRA training on the verified proxy\n"
        f"data: {json.dumps(data)}   # your training file: JSONL lines {{\"prompt\": ..., \"response\": ...}}\n"
        "keyset: keyset.json       # the operator's keyset, pinned: the proxy bundle must verify against it\n"
        "# DP-SGD: your own setting, never taken from the server. The federation's policy (policy.json) is the\n"
        "# loosest it accepts: a larger epsilon or delta than the policy, or DP off when it requires DP, is refused.\n"
        "# This site's own policy requires DP too (policy.require_dp, default true): with enabled: false the client\n"
        "# refuses to start; opt out only for a test federation without personal data (policy: {require_dp: false}).\n"
        f"dp: {dp_line}\n"
        f"threads: {int(threads)}                # torch CPU threads for local training\n"
        f"seed: {int(seed)}\n"
    )
