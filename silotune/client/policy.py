"""A silo's own privacy policy: what it will spend and answer, whatever the coordinator asks.

The silo's operator sets the policy (a deployed silo: `silotune agent` flags, kept in its
node config; a simulated silo: the simulation's settings). A request can only make the
silo stricter: a run target above the silo's epsilon, a delta above its delta, more
DP-SGD steps in one federation than it allows, or an importance query it does not
answer is refused before anything touches the data, with a coded error (`ERROR_POLICY`)
whose reason the coordinator records. docs/privacy.md §7 lists what every reply releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The smallest calibration batch an importance query may ask for: tiny batches would make
# each released score the statistic of a handful of records.
MIN_IMPORTANCE_BATCH = 8

# Training whose noise would drown the signal is refused: the noise on the averaged
# gradient has std sigma * C / (q n); above this many clip norms per step the update is
# noise (docs/privacy.md §7). The default run's sigma ~0.5 at q n = 32 gives 0.016.
MAX_NOISE_PER_AVERAGED_GRADIENT = 1.0


class PolicyRefusalError(ValueError):
    """A request outside the silo's own policy (refused before any training)."""


@dataclass(frozen=True)
class SiloPolicy:
    """What the silo allows. `epsilon` and `delta` bound the cumulative epsilon of its
    dataset over its whole life (inf: a non-private silo, in simulations only)."""

    epsilon: float
    delta: float
    max_steps: int | None = None  # most DP-SGD steps the silo trains in one federation
    importance_queries: int = 0  # most importance queries it answers in its life
    importance_noise: float = 1.0  # sigma of its DP importance scoring
    diagnostics: bool = False  # simulated silos only: peak memory, worker, token length
    # The privacy unit: None = one row; a column name = all rows sharing its value (e.g.
    # a patient id) are one unit, sampled and clipped together (docs/privacy.md §8).
    privacy_unit_column: str | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"policy epsilon = {self.epsilon} must be > 0")
        if not 0.0 < self.delta < 0.1:
            raise ValueError(f"policy delta = {self.delta} must be in (0, 0.1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"policy max-steps = {self.max_steps} must be >= 1")
        if self.importance_queries < 0:
            raise ValueError("policy importance-queries must be >= 0")
        if not (math.isfinite(self.importance_noise) and self.importance_noise > 0):
            raise ValueError("policy importance-noise must be a finite number > 0")
        if self.privacy_unit_column is not None and (
                not self.privacy_unit_column.strip() or '"' in self.privacy_unit_column):
            raise ValueError(f"policy privacy-unit-column {self.privacy_unit_column!r} must "
                             "be a non-empty column name without double quotes")

    @property
    def privacy_unit(self) -> str:
        """The unit as the ledger records it: "example", or "group:COLUMN"."""
        column = self.privacy_unit_column
        return "example" if column is None else f"group:{column}"

    def check_per_row_release(self, what: str) -> None:
        """Refuse a release whose mechanism treats each row as the unit (importance
        scores, the CrossLM small model) when the silo's unit spans several rows."""
        if self.privacy_unit_column is not None:
            raise PolicyRefusalError(
                f"{what} treats one row as the privacy unit, and this silo's unit is "
                f"{self.privacy_unit!r}: refused (not supported with privacy-unit-column)")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def check_train(self, target_epsilon: float, target_delta: float,
                    planned_steps: int) -> None:
        """Refuse a training request looser than the policy."""
        if self.private and not target_epsilon <= self.epsilon:
            raise PolicyRefusalError(
                f"the run's target epsilon {target_epsilon} exceeds this silo's policy "
                f"(epsilon <= {self.epsilon}); a run may only ask for less")
        if self.private and not target_delta <= self.delta:
            raise PolicyRefusalError(
                f"the run's target delta {target_delta} exceeds this silo's policy "
                f"(delta <= {self.delta})")
        if self.max_steps is not None and planned_steps > self.max_steps:
            raise PolicyRefusalError(
                f"the run plans {planned_steps} DP-SGD steps on this silo; its policy "
                f"allows at most {self.max_steps} per federation")

    def check_importance(self, answered: int, answered_in_federation: int,
                         batch_size: int) -> None:
        """Refuse an importance query beyond the policy's caps."""
        self.check_per_row_release("DP importance scoring")
        if batch_size < MIN_IMPORTANCE_BATCH:
            raise PolicyRefusalError(
                f"the importance query asks for calibration batches of {batch_size}; this "
                f"silo scores batches of at least {MIN_IMPORTANCE_BATCH}")
        if answered >= self.importance_queries:
            raise PolicyRefusalError(
                f"this silo answers at most {self.importance_queries} importance queries "
                f"(has answered {answered}); its operator can raise --importance-queries")
        if answered_in_federation >= 1:
            raise PolicyRefusalError("this silo answers one importance query per federation")


def check_useful(noise_multiplier: float, expected_batch: float) -> None:
    """Refuse training whose noise would drown the averaged gradient."""
    per_step = noise_multiplier / max(expected_batch, 1e-12)
    if per_step > MAX_NOISE_PER_AVERAGED_GRADIENT:
        raise PolicyRefusalError(
            f"the remaining budget would need noise multiplier {noise_multiplier:.3g} "
            f"(noise {per_step:.3g} clip norms on each averaged gradient, above "
            f"{MAX_NOISE_PER_AVERAGED_GRADIENT}): training would be noise")
