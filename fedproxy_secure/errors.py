"""Exception types shared across the SDK.

Every error the user can fix names the field (or file) at fault and how to fix it.
"""

from __future__ import annotations


class FedProxyError(Exception):
    """Base class of every error raised on purpose by fedproxy-secure."""


class ConfigError(FedProxyError):
    """A configuration value is invalid; the message names the field path, the value and the fix."""


class DataError(FedProxyError):
    """Input data is missing, empty or malformed."""


class ModelError(FedProxyError):
    """A model folder cannot be used (not a causal LM, unknown architecture, shape mismatch)."""


class SecurityError(FedProxyError):
    """A security check failed (bad signature, tampered file, replay, malicious message)."""


class ProtocolAbort(SecurityError):
    """A protocol participant aborted the round; the message says why."""


class PrivacyBudgetExceeded(FedProxyError):
    """Training this round would spend more differential-privacy budget than the client allows."""
