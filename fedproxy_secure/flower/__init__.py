"""FedProxy as a Flower app (optional extra ``[flower]``, PyPI ``flwr[simulation]``).

* :mod:`fedproxy_secure.flower.server_app` -- the ServerApp: holds the LLM, compresses it into the
  proxy with the SDK, issues the *signed* proxy bundle, runs the rounds, aggregates with the SDK's
  aggregators (FedAvg, H-TIES, SA-H-TIES, ...) and fuses + evaluates the LLM on the server.
* :mod:`fedproxy_secure.flower.client_app` -- the ClientApp: verifies the bundle against the
  site's pinned keyset exactly as ``client join`` does, then trains with the SDK's
  :func:`fedproxy_secure.client.trainer.train_round` (FFA-LoRA, PCR, DP-SGD + accountant).
* Secure sums (FedAvg's weighted mean, SA-H-TIES's two phase sums) go through Flower's SecAgg+
  workflow when ``secure = "secaggplus"``; see docs/flower.md for what that protocol guarantees.

:mod:`settings` and :mod:`bundle_wire` import nothing from ``flwr`` (they are tested without it);
the app modules import ``flwr`` at module import time.
"""

from __future__ import annotations

from fedproxy_secure.flower.settings import FlowerSettings

__all__ = ["FlowerSettings"]
