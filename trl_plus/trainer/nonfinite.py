"""The last line of defence against non-finite training: a NaN or inf loss or gradient never reaches the weights.

The trainer reports every micro-batch's loss (`record_loss`) and, once per optimizer step, the gradient norm
(`should_skip_step`). A step in which either was non-finite is skipped: the trainer drops its gradients, so the
optimizer leaves the weights and its own state (moments, step count) untouched. After `max_consecutive` such steps in
a row, training stops with an error naming the quantity and the step, since a run that cannot take a finite step is
not training.
"""

import logging
import math

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many consecutive optimizer steps had a non-finite loss or gradient norm."""


class NonFiniteStepGuard:
    """Decides, per optimizer step, whether its update is skipped for a non-finite loss or gradient norm.

    >>> guard = NonFiniteStepGuard(max_consecutive=2)
    >>> guard.record_loss(float("nan"))
    >>> guard.should_skip_step(grad_norm=1.0, step=7)
    True
    >>> guard.should_skip_step(grad_norm=0.5, step=8), guard.num_skipped
    (False, 1)
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.num_skipped = 0  # over the whole run
        self.num_consecutive = 0
        self._bad_loss: float | None = None  # the first non-finite micro-batch loss of the current step

    def record_loss(self, loss: float) -> None:
        """Called for every micro-batch's loss (on every process)."""
        if not math.isfinite(loss) and self._bad_loss is None:
            self._bad_loss = loss

    @property
    def has_bad_loss(self) -> bool:
        """Whether a micro-batch of the current optimizer step had a non-finite loss on this process."""
        return self._bad_loss is not None

    def should_skip_step(self, grad_norm: float | None, step: int, loss_was_finite_everywhere: bool = True) -> bool:
        """Whether optimizer step `step` (1-based) must be skipped; raises after `max_consecutive` skips in a row.

        `loss_was_finite_everywhere` is False when another process saw a non-finite loss in this step: the decision
        must be the same on every process.
        """
        bad_loss, self._bad_loss = self._bad_loss, None
        if bad_loss is not None or not loss_was_finite_everywhere:
            cause = (
                f"the loss was {bad_loss}" if bad_loss is not None else "the loss was non-finite on another process"
            )
        elif grad_norm is not None and not math.isfinite(grad_norm):
            cause = f"the gradient norm was {grad_norm}"
        else:
            self.num_consecutive = 0
            return False
        self.num_skipped += 1
        self.num_consecutive += 1
        if self.num_consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"Optimizer step {step}: {cause}. That makes {self.num_consecutive} optimizer steps in a row with a "
                f"non-finite loss or gradient norm (max_consecutive_nonfinite_steps={self.max_consecutive}); training "
                "stopped. None of their updates reached the weights, which are those of the last finite step. Look "
                "for a reward, learning rate or input that makes the loss overflow."
            )
        logger.warning(
            f"Optimizer step {step}: {cause}; the update was skipped (weights and optimizer state unchanged). "
            f"{self.num_consecutive} in a row (training stops at {self.max_consecutive}), {self.num_skipped} in all."
        )
        return True

    def state_dict(self) -> dict:
        return {"num_skipped": self.num_skipped, "num_consecutive": self.num_consecutive}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"num_skipped", "num_consecutive"}:
            raise ValueError(
                f"NonFiniteStepGuard state must have keys num_skipped, num_consecutive; got {sorted(state)}."
            )
        self.num_skipped, self.num_consecutive = int(state["num_skipped"]), int(state["num_consecutive"])
