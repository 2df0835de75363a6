"""Differential privacy for clients: accountant (PRV), on-disk budget, DP-SGD with opacus, update clipping.

DP here is **example-level** (one record of one institution), not institution-level; see
SECURITY.md, Differential privacy.
"""

from fedproxy_secure.privacy.accountant import ACCOUNTANT_NAME, epsilon_spent, noise_multiplier_for
from fedproxy_secure.privacy.budget import PrivacyBudget
from fedproxy_secure.privacy.clip import clip_l2

__all__ = ["ACCOUNTANT_NAME", "PrivacyBudget", "clip_l2", "epsilon_spent", "noise_multiplier_for"]
