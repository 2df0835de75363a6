"""fedproxy-secure: secure federated fine-tuning of an LLM through a proxy small language model.

The SDK is importable without the CLI (typer is only used under ``cli/``).
Stages: ``compress`` (i), ``client`` + ``aggregate`` (ii), ``fuse`` (iii); ``secagg`` carries
client updates so the server only learns sums; ``artifacts`` signs what the server issues.
"""

__version__ = "0.1.0"
