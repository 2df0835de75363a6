"""Secure aggregation: every mode exposes :class:`SecureSummer` (see ``base.py``)."""

from __future__ import annotations

from fedproxy_secure.secagg.base import DropoutPlan, PlainSummer, SecureSummer, SecureSumResult

__all__ = ["DropoutPlan", "PlainSummer", "SecureSummer", "SecureSumResult", "make_summer"]


def make_summer(mode: str, **options) -> SecureSummer:
    """Build the summer for ``mode`` (``plain`` | ``masking`` | ``he``) with mode options."""
    if mode in ("none", "plain"):
        return PlainSummer()
    if mode == "masking":
        from fedproxy_secure.secagg.masking import MaskingSummer

        return MaskingSummer(**options)
    if mode == "he":
        from fedproxy_secure.secagg.he import CKKSSummer

        return CKKSSummer(**options)
    raise ValueError(f"secagg.mode: unknown mode {mode!r}; use one of none, masking, he")
