"""A client's differential-privacy budget, kept on disk across rounds and restarts.

State file (JSON, written atomically): total ε, δ, accountant, and the history of every round
trained: ``{round_id, noise_multiplier, sample_rate, steps, epsilon_after}``. A round is refused
*before* training if the history plus the round's planned steps would exceed the total ε.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fedproxy_secure.errors import ConfigError, PrivacyBudgetExceeded
from fedproxy_secure.privacy.accountant import ACCOUNTANT_NAME, epsilon_spent

_TOL = 1e-9


class PrivacyBudget:
    """Total ε at a fixed δ, with the history of what was spent; persisted at ``path``."""

    def __init__(self, path: str | os.PathLike, total_epsilon: float, delta: float) -> None:
        self.path = Path(path)
        if not total_epsilon > 0 or not 0 < delta < 1:
            raise ConfigError(f"budget: total_epsilon={total_epsilon!r} must be > 0 and delta={delta!r} in (0, 1)")
        self.total_epsilon = float(total_epsilon)
        self.delta = float(delta)
        self.rounds: list[dict] = []
        if self.path.exists():
            try:
                state = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"budget file {str(self.path)!r} is unreadable ({exc}); restore it from a backup "
                                  "(deleting it would reset the spent budget, which is not allowed)") from None
            if abs(float(state.get("delta", -1)) - self.delta) > 0:
                raise ConfigError(f"budget file {str(self.path)!r} was kept at delta={state.get('delta')}, "
                                  f"not {self.delta}; keep dp.delta fixed for the whole federation")
            if float(state.get("total_epsilon", self.total_epsilon)) < self.total_epsilon:
                raise ConfigError(f"budget file {str(self.path)!r}: total_epsilon was {state.get('total_epsilon')}; "
                                  "the budget cannot be raised after training started")
            self.rounds = list(state.get("rounds", []))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, steps)]`` of every recorded round."""
        return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in self.rounds]

    def spent(self) -> float:
        """ε spent so far at this budget's δ (PRV upper bound)."""
        return epsilon_spent(self.history, self.delta)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after the recorded history plus ``steps`` more steps at ``(noise_multiplier, sample_rate)``."""
        return epsilon_spent(self.history + [(noise_multiplier, sample_rate, steps)], self.delta)

    def check_can_spend(self, noise_multiplier: float, sample_rate: float, steps: int, round_id: int | None = None) -> float:
        """Return the ε the round would leave spent; raise PrivacyBudgetExceeded if above the total."""
        if round_id is not None and any(r["round_id"] == round_id for r in self.rounds):
            raise PrivacyBudgetExceeded(f"round {round_id} was already trained under this budget "
                                        f"({self.path}); a round is never trained twice on the same data")
        after = self.epsilon_if(noise_multiplier, sample_rate, steps)
        if after > self.total_epsilon + _TOL:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: training round {round_id} ({steps} steps, noise {noise_multiplier:.3f}, "
                f"sample rate {sample_rate:.4f}) would bring epsilon to {after:.3f} > total {self.total_epsilon} "
                f"at delta={self.delta} (spent so far {self.spent():.3f} over {len(self.rounds)} rounds; "
                f"budget file {self.path}). This client stops contributing; raise the total only with a new "
                "privacy review"
            )
        return after

    def record(self, round_id: int, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Append a trained round and write the file atomically; return ε spent after it."""
        after = self.epsilon_if(noise_multiplier, sample_rate, steps)
        self.rounds.append({"round_id": int(round_id), "noise_multiplier": float(noise_multiplier),
                            "sample_rate": float(sample_rate), "steps": int(steps), "epsilon_after": after})
        self._save()
        return after

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"total_epsilon": self.total_epsilon, "delta": self.delta, "accountant": ACCOUNTANT_NAME,
                 "rounds": self.rounds}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".budget-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(state, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

