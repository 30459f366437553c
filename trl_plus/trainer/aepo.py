"""AEPO (arXiv 2510.08141) in a trainer: the entropy-regulated temperature, sampling at it, and the regularizer's rows.

Per generation batch (the authors' `RayPPOTrainer.fit`, `alg == "AEPO"`, github.com/597358816/AEPO):
1. the temperature is T_high if the mean token entropy of the last update (TRL's `entropy` metric, averaged over its
   micro-batches; 0 before the first, so the first batch samples at T_high) is at or below the target, else T_low;
2. the first `prompt_fraction` of the batch's prompts (whole groups) are sampled again at that temperature, scored,
   and given the configured estimator's advantages;
3. those with advantage > `advantage_threshold` are the rewarded samples; up to `num_samples` of them over all
   processes (half of that when entropy is above the target) replace the first rows of the generation batch, with
   advantage 1 and no importance-sampling correction (they are meant to be off the sampling distribution). The batch
   keeps its size; the replaced rows are not trained on.
Their log-probs are the policy's at the training temperature (TRL's `temperature`), as the authors' old log-probs at
T = 1, so the policy loss on them is the REINFORCE term alpha * grad log pi(o) * 1 inside the usual clip.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..algos.entropy_control import aepo_num_regularizer_samples, aepo_temperature


class AEPOController:
    """The regulated temperature: observes the entropy of each update and chooses the next batch's temperature.

    `state_dict` / `load_state_dict` hold the last update's entropy (and the running window), for checkpoints.
    """

    def __init__(self, target: float, temperature_high: float, temperature_low: float, num_samples: int):
        self.target, self.num_samples = target, num_samples
        self.temperature_high, self.temperature_low = temperature_high, temperature_low
        self.entropy = 0.0  # the authors start from 0: the first batch is sampled at temperature_high
        self._window_sum, self._window_count = 0.0, 0

    def observe(self, entropy: float) -> None:
        """One micro-batch's mean token entropy (the same value on every process: TRL's metric is global)."""
        self._window_sum += entropy
        self._window_count += 1

    def next_temperature(self) -> float:
        """Close the window of the last update (if it observed anything) and return the temperature it calls for."""
        if self._window_count:
            self.entropy = self._window_sum / self._window_count
            self._window_sum, self._window_count = 0.0, 0
        return aepo_temperature(self.entropy, self.target, self.temperature_high, self.temperature_low)

    def num_regularizer_samples(self, num_selected: int) -> int:
        return aepo_num_regularizer_samples(self.entropy, self.target, self.num_samples, num_selected)

    def state_dict(self) -> dict:
        return {"entropy": self.entropy, "window_sum": self._window_sum, "window_count": self._window_count}

    def load_state_dict(self, state: dict) -> None:
        self.entropy = float(state["entropy"])
        self._window_sum, self._window_count = float(state["window_sum"]), int(state["window_count"])


@contextmanager
def sampling_temperature(trainer, temperature: float) -> Iterator[None]:
    """Generate at `temperature` inside the block: TRL's generation config (transformers `generate`, continuous
    batching) or its vLLM generator. `trainer.temperature`, which scales the logits of the log-probs, is unchanged."""
    targets = []
    if getattr(trainer, "generation_config", None) is not None:
        targets.append((trainer.generation_config, "temperature"))
    vllm_generation = getattr(trainer, "vllm_generation", None)
    if getattr(trainer, "use_vllm", False) and vllm_generation is not None:
        targets.append((vllm_generation, "temperature"))
    saved = [getattr(obj, name) for obj, name in targets]
    generation_kwargs = getattr(trainer, "generation_kwargs", None)
    saved_kwarg = generation_kwargs.get("temperature") if isinstance(generation_kwargs, dict) else None
    try:
        for obj, name in targets:
            setattr(obj, name, temperature)
        if isinstance(generation_kwargs, dict):
            generation_kwargs["temperature"] = temperature
        yield
    finally:
        for (obj, name), value in zip(targets, saved, strict=True):
            setattr(obj, name, value)
        if isinstance(generation_kwargs, dict):
            generation_kwargs["temperature"] = saved_kwarg


def regularizer_rows(rows: list[dict], rewarded: torch.Tensor, count: int, token_advantages: bool) -> list[dict]:
    """The first `count` rewarded rows, each with advantage 1 (`(T,)` ones on its valid tokens when the batch's
    advantages are per token) and importance-sampling ratio 1."""
    chosen = [row for row, is_rewarded in zip(rows, rewarded.tolist(), strict=True) if is_rewarded][:count]
    result = []
    for row in chosen:
        row = dict(row)
        mask = row["completion_mask"].to(row["advantages"].dtype)
        row["advantages"] = mask if token_advantages else torch.ones_like(row["advantages"]).reshape(())
        if "importance_sampling_ratio" in row:
            row["importance_sampling_ratio"] = torch.ones_like(row["importance_sampling_ratio"])
        result.append(row)
    return result
