"""The sampler: decides which prompts are generated for a training step and which generated groups it trains on.

It owns DAPO dynamic sampling (arXiv 2503.14476 sec. 3.2: rounds of generation until the batch holds its number of
groups whose rewards differ), the surplus buffer (valid groups beyond a step's need, trained at the next step), the
stream of extra prompts those rounds draw from, and GRESO selective rollout (arXiv 2506.02177: prompts skipped before
generation, replaced from the same stream). The trainer calls `sample` once per generation batch with a function that
generates and scores a batch of prompts; it gets back the batch to train on.

Every process must run the same collectives and end with as many rows: every decision here is made from gathered
data (rewards, prompt keys) or from state that is identical on every process (the selective-rollout generator).
"""

import logging
from collections.abc import Callable, Iterable

import torch

from ..rewards.majority_vote import prompt_key
from .dynamic import PromptBatchStream, SurplusBuffer, groups_with_signal, split_rows, stack_rows
from .selective import SOLVED, UNSOLVED, SelectiveRollout

# Prompt batches drawn from the stream to replace skipped prompts before a round is generated anyway (with the
# skipped prompts filling what is still missing): skipping costs no generation, but an endless draw would hang.
MAX_REPLACEMENT_DRAWS = 8

logger = logging.getLogger(__name__)


class NotFilledError(RuntimeError):
    """Dynamic sampling's rounds did not give the batch its number of groups with a reward signal (strict mode)."""


class Sampler:
    """Dynamic sampling, surplus buffer, extra-prompt stream and selective rollout behind one call, `sample`.

    Args:
        group_size: completions per prompt (num_generations).
        num_processes, process_index: this process's place; rows are global in rank order.
        prompt_batches: `epoch -> iterable of local prompt batches` (the extra-prompt stream, see
            `PromptBatchStream`): each batch is a list of rows like the trainer's inputs, whole groups included.
        gather_object: gathers a picklable object from every process into a list in rank order.
        to_training_batch: makes the stacked local rows a training batch (device, `num_items_in_batch`).
        old_log_probs: `batch -> (N, T)` log-probs of the current policy, or None when the trainer computes the
            sampling policy's log-probs itself (then buffered rows already carry theirs).
        log_metric: `(name, value)` for the trainer's training metrics.
        pad_values: the padding value of each key when rows are stacked.
        dynamic_sampling, max_num_gen_batches, strict: DAPO dynamic sampling and its round cap.
        selective_rollout: the GRESO filter, or None.
    """

    def __init__(
        self,
        group_size: int,
        num_processes: int,
        process_index: int,
        prompt_batches: Callable[[int], Iterable],
        gather_object: Callable[[list], list],
        to_training_batch: Callable[[dict], dict],
        old_log_probs: Callable[[dict], torch.Tensor] | None,
        log_metric: Callable[[str, float], None],
        pad_values: dict[str, float],
        dynamic_sampling: bool = False,
        max_num_gen_batches: int = 10,
        strict: bool = False,
        selective_rollout: SelectiveRollout | None = None,
        buffer_capacity_groups: int = 0,
    ):
        self.group_size = group_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.prompt_stream = PromptBatchStream(prompt_batches)
        self.surplus = SurplusBuffer(group_size, capacity_groups=buffer_capacity_groups)
        self.selective_rollout = selective_rollout
        self.dynamic_sampling = dynamic_sampling
        self.max_num_gen_batches = max_num_gen_batches
        self.strict = strict
        self.pad_values = pad_values
        self._gather_object = gather_object
        self._to_training_batch = to_training_batch
        self._old_log_probs = old_log_probs
        self._log_metric = log_metric

    # ------------------------------------------------------------------ the step
    def sample(self, inputs: list[dict], generate_and_score: Callable[[list[dict]], tuple[dict, torch.Tensor]]):
        """The batch to train on for this generation batch.

        `generate_and_score(local_inputs)` generates and scores a batch of prompts and returns this process's output
        and the rewards of every process's rows, `(N,)` in rank order (NaN where unscored).
        """
        step = _Step()
        round_inputs, keys = self._select_prompts(inputs, step)
        if not self.dynamic_sampling:
            output, rewards = generate_and_score(round_inputs)
            has_signal = self._observe(keys, rewards, step)
            self._finish(step, num_trained_groups=int(has_signal.sum()))
            return output
        return self._dynamic_sampling(inputs, round_inputs, keys, generate_and_score, step)

    def _dynamic_sampling(self, inputs, round_inputs, keys, generate_and_score, step):
        """Rounds of generation until the batch holds its number of groups with a reward signal.

        Every process runs the same rounds (the exit is decided from gathered rewards), then all rows are gathered
        and each process takes the same number of rows, so collectives and shapes match across processes.
        """
        group_size = self.group_size
        local_size = len(inputs)
        target_rows = local_size * self.num_processes
        rank_offset = self.process_index * local_size
        rounds, num_valid_groups = [], self.surplus.num_groups
        for round_index in range(self.max_num_gen_batches):
            if round_index:
                round_inputs, keys = self._select_prompts(next(self.prompt_stream), step)
            output, rewards = generate_and_score(round_inputs)
            has_signal = self._observe(keys, rewards, step)  # identical on every process
            row_groups = (rank_offset + torch.arange(local_size, device=has_signal.device)) // group_size
            row_has_signal = has_signal[row_groups]
            rounds.append((split_rows(_to_cpu(output), local_size), row_has_signal.tolist()))
            num_valid_groups += int(has_signal.sum())
            if num_valid_groups * group_size >= target_rows:
                break
        else:
            message = (
                f"Dynamic sampling: {self.max_num_gen_batches} generation rounds gave {num_valid_groups} groups with "
                f"a reward signal out of the {target_rows // group_size} needed (max_num_gen_batches)."
            )
            if self.strict:
                raise NotFilledError(message + " Set dynamic_sampling_strict=False to train on a partly filled batch.")
            logger.warning(message + " The missing groups are masked out of the loss.")

        valid_rows, rows_without_signal = [], []
        for round_index in range(len(rounds)):  # global order: round, then process, then row
            for process_rounds in self._gather_object([rounds]):
                rows, row_flags = process_rounds[round_index]
                for row, row_signal in zip(rows, row_flags, strict=True):
                    (valid_rows if row_signal else rows_without_signal).append(row)

        buffered_rows = self.surplus.take_all()
        candidates = buffered_rows + valid_rows
        batch_rows, surplus_rows = candidates[:target_rows], candidates[target_rows:]
        num_filler_rows = target_rows - len(batch_rows)
        for row in rows_without_signal[:num_filler_rows]:  # whole groups: masked out of the loss
            batch_rows.append({**row, "completion_mask": torch.zeros_like(row["completion_mask"])})
        num_buffered_used = min(len(buffered_rows), target_rows)
        self._fill_old_log_probs(batch_rows, surplus_rows, num_buffered_used)
        num_dropped_groups = self.surplus.put(surplus_rows)
        local_rows = batch_rows[rank_offset : rank_offset + local_size]
        batch = self._to_training_batch(stack_rows(local_rows, self.pad_values))

        num_kept_groups = (target_rows - num_filler_rows) // group_size
        log = self._log_metric
        log("dynamic_sampling/rounds", len(rounds))
        log("dynamic_sampling/groups_generated", step.num_groups)
        log("dynamic_sampling/groups_kept", num_kept_groups)
        log("dynamic_sampling/groups_from_buffer", num_buffered_used // group_size)
        log("dynamic_sampling/groups_masked", num_filler_rows // group_size)
        log("dynamic_sampling/groups_dropped", num_dropped_groups)
        log("dynamic_sampling/buffer_size", self.surplus.num_groups)
        log("dynamic_sampling/zero_std_fraction", step.num_zero_variance / max(step.num_groups, 1))
        self._finish(step, num_trained_groups=num_kept_groups)
        return batch

    def _fill_old_log_probs(self, batch_rows: list[dict], surplus_rows: list[dict], num_buffered_used: int) -> None:
        """Give buffered rows the log-probs of the policy that sampled them, so their ratio is importance-correct.

        Surplus rows are scored now, by the policy that sampled them. When the trainer computed no old log-probs
        (on-policy updates) and the batch mixes buffered rows in, the fresh rows get the current policy's, i.e.
        ratio 1. Called identically on every process (global rows), so the forward passes match under ZeRO-3 / FSDP.
        """
        if self._old_log_probs is None:
            return  # the trainer computed them in every round
        for rows in (surplus_rows, batch_rows[num_buffered_used:] if num_buffered_used else []):
            if not rows:
                continue
            log_probs = self._old_log_probs(stack_rows(rows, self.pad_values)).cpu()
            for row, row_log_probs in zip(rows, log_probs, strict=True):
                row["old_per_token_logps"] = row_log_probs[: row["completion_ids"].size(0)]

    # ------------------------------------------------------------------ selective rollout
    def _select_prompts(self, inputs: list[dict], step: "_Step") -> tuple[list[dict], list[str] | None]:
        """This process's inputs with the prompts selective rollout skips replaced by prompts of the stream, and the
        keys of the global groups that will be generated (None without selective rollout).

        The groups are decided on the gathered rows (groups can straddle processes); every process draws as many
        batches from the stream, so its position stays the same everywhere.
        """
        if self.selective_rollout is None:
            return inputs, None
        group_size, local_size = self.group_size, len(inputs)
        num_groups = local_size * self.num_processes // group_size
        kept, skipped = [], []
        candidates = inputs
        for draw in range(MAX_REPLACEMENT_DRAWS + 1):
            if draw:
                candidates = next(self.prompt_stream)
            rows = [row for process_rows in self._gather_object([candidates]) for row in process_rows]
            groups = [rows[start : start + group_size] for start in range(0, len(rows), group_size)]
            keys = [prompt_key(group[0].get("prompt")) for group in groups]
            for group, key, skip in zip(groups, keys, self.selective_rollout.choose_skipped(keys), strict=True):
                (skipped if skip else kept).append((key, group))
            if len(kept) >= num_groups:
                break
        chosen = kept[:num_groups]
        # Short of kept prompts: generate skipped ones after all, those likeliest to carry a signal first (highest
        # keep probability: the shortest streaks; the sort is stable, so ties keep the stream's order).
        skipped.sort(key=lambda entry: -self.selective_rollout.keep_probability(entry[0]))
        forced = skipped[: num_groups - len(chosen)]
        step.num_skipped += len(skipped) - len(forced)
        step.num_forced += len(forced)
        chosen += forced
        step.all_returning &= all(self.selective_rollout.has_history(key) for key, _ in chosen)
        rows = [row for _, group in chosen for row in group]
        start = self.process_index * local_size
        return rows[start : start + local_size], [key for key, _ in chosen]

    # ------------------------------------------------------------------ bookkeeping
    def _observe(self, keys: list[str] | None, rewards: torch.Tensor, step: "_Step") -> torch.Tensor:
        """`(num_groups,)` bool: which groups of a generated round have a reward signal; counts them for the step's
        metrics and records each prompt's outcome for selective rollout."""
        grouped = rewards.detach().float().cpu().view(-1, self.group_size)
        has_signal = groups_with_signal(grouped.flatten(), self.group_size)
        step.num_groups += len(has_signal)
        step.num_zero_variance += int((~has_signal).sum())
        if self.selective_rollout is not None:
            step.outcomes += self.selective_rollout.record(keys, grouped)
        return has_signal.to(rewards.device)

    def _finish(self, step: "_Step", num_trained_groups: int) -> None:
        """Log the step's sampling metrics and adapt selective rollout's exploration probabilities."""
        log = self._log_metric
        log("sampling/zero_variance_fraction", step.num_zero_variance / max(step.num_groups, 1))
        log("sampling/completions_per_trained_group", step.num_groups * self.group_size / max(num_trained_groups, 1))
        if self.selective_rollout is None:
            return
        # GRESO adapts from its second epoch on (`epoch > 0` in the authors' ray_trainer.py), when every generated
        # prompt has a history the filter can act on: here, at the steps that generated only returning prompts.
        # Adapting earlier would count groups the filter could not have skipped and drive p to its floor first.
        if step.all_returning:
            self.selective_rollout.adapt(step.outcomes)
        log("selective_rollout/prompts_skipped", step.num_skipped)
        log("selective_rollout/prompts_forced", step.num_forced)
        log("selective_rollout/exploration_solved", self.selective_rollout.exploration[SOLVED])
        log("selective_rollout/exploration_unsolved", self.selective_rollout.exploration[UNSOLVED])

    # ------------------------------------------------------------------ checkpoints
    @property
    def _sections(self) -> dict:
        sections = {"surplus_buffer": self.surplus, "prompt_stream": self.prompt_stream}
        if self.selective_rollout is not None:
            sections["selective_rollout"] = self.selective_rollout
        return sections

    def state_dict(self) -> dict:
        """`{section: state}`: the surplus buffer, the stream's position and, with selective rollout, its history."""
        return {name: section.state_dict() for name, section in self._sections.items()}

    def load_state_dict(self, state: dict) -> None:
        sections = self._sections
        if not isinstance(state, dict) or set(state) != set(sections):
            saved = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"it holds the sections {saved}, expected {sorted(sections)}")
        for name, section in sections.items():
            section.load_state_dict(state[name])


class _Step:
    """Counts of one training step's sampling, over all its rounds (global, identical on every process)."""

    def __init__(self):
        self.num_groups = 0
        self.num_zero_variance = 0
        self.num_skipped = 0
        self.num_forced = 0  # skipped prompts generated anyway: the draws found too few to keep
        self.all_returning = True  # every prompt generated in the step had a history before it was chosen
        self.outcomes: list[int] = []


def _to_cpu(batch: dict) -> dict:
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
