"""PPO-ptx's stream of pretraining text (InstructGPT, arXiv 2203.02155 eq. 2) and its language-model loss.

InstructGPT's objective adds gamma * E_{x ~ D_pretrain}[log pi(x)] to the PPO objective, so the minimized loss is
L_PPO + ptx_coef * NLL(batch of pretraining text). `PtxStream` hands each training micro-batch one batch of that text,
sharded over processes like TRL's prompts: every epoch is one permutation of the dataset (seeded, the same on every
process), cut into global batches of `batch_size * num_processes` rows, and process p takes rows
[p * batch_size, (p + 1) * batch_size) of each, so the processes see disjoint text. A last partial global batch is
dropped (as TRL's sampler drops a partial generation batch). Its position (epoch, batch) is its `state_dict`, saved in
PPO's checkpoint state, so a resumed run continues with the next unseen batch.

>>> from trl_plus.tiny import build_char_tokenizer
>>> stream = PtxStream(["ab", "cd", "ef", "gh"], build_char_tokenizer(), batch_size=1, num_processes=2,
...     process_index=1, seed=0)
>>> stream.batches_per_epoch, stream.state_dict()["epoch"], stream.state_dict()["batch"]
(2, 0, 0)
"""

from typing import Any

import torch
import torch.nn.functional as F

TEXT_FIELD = "text"


class PtxStream:
    """Batches of pretraining text for one process, resumable; see the module docstring.

    `texts` is a list of strings or a dataset with a "text" column. `max_length` truncates each text (None: no
    truncation). Batches are padded on the right with the tokenizer's pad token, `attention_mask` marking the text.
    """

    def __init__(
        self,
        texts,
        tokenizer,
        batch_size: int,
        num_processes: int,
        process_index: int,
        seed: int,
        max_length: int | None = None,
    ) -> None:
        columns = getattr(texts, "column_names", None)
        if columns is not None:
            if TEXT_FIELD not in columns:
                raise ValueError(
                    f"`ptx_dataset` has no `{TEXT_FIELD}` column; its columns are {columns}. PPO-ptx trains the "
                    f"policy's language-model loss on plain text: rename the text column to `{TEXT_FIELD}`."
                )
            texts = texts[TEXT_FIELD]
        self.texts = list(texts)
        if not all(isinstance(text, str) for text in self.texts):
            raise ValueError(f"`ptx_dataset`'s `{TEXT_FIELD}` column must hold strings.")
        self.tokenizer, self.batch_size, self.max_length, self.seed = tokenizer, batch_size, max_length, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.batches_per_epoch = len(self.texts) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"`ptx_dataset` has {len(self.texts)} rows, fewer than one global PPO-ptx batch of "
                f"{self.global_batch_size} (ptx_batch_size {batch_size} x {num_processes} processes). Give more text "
                "or lower ptx_batch_size."
            )
        self.epoch, self.batch = 0, 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    def next_texts(self) -> list[str]:
        """This process's texts of the next global batch; advances the stream (and starts a new epoch when due)."""
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        order = torch.randperm(len(self.texts), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start = self.batch * self.global_batch_size + self.process_index * self.batch_size
        self.batch += 1
        return [self.texts[index] for index in order[start : start + self.batch_size].tolist()]

    def next_batch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The next texts tokenized: `input_ids` and `attention_mask`, `(B, L)`, right-padded."""
        kwargs = {"truncation": True, "max_length": self.max_length} if self.max_length is not None else {}
        ids = self.tokenizer(self.next_texts(), **kwargs)["input_ids"]
        length = max(1, *map(len, ids))
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, : len(tokens)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_rows": len(self.texts),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = {"epoch", "batch", "seed", "num_rows", "global_batch_size"}
        if set(state_dict) != expected:
            raise ValueError(
                f"PtxStream.load_state_dict expects the keys {sorted(expected)}, got {sorted(state_dict)}."
            )
        current = self.state_dict()
        changed = [key for key in ("seed", "num_rows", "global_batch_size") if state_dict[key] != current[key]]
        if changed:  # the saved position would point into another order of the text
            raise ValueError(
                "the PPO-ptx stream was saved with "
                + ", ".join(f"{key}={state_dict[key]}" for key in changed)
                + " and this run has "
                + ", ".join(f"{key}={current[key]}" for key in changed)
                + ": resume with the same ptx_dataset, ptx_batch_size, number of processes and seed."
            )
        if not (0 <= int(state_dict["batch"]) <= self.batches_per_epoch and int(state_dict["epoch"]) >= 0):
            raise ValueError(f"the PPO-ptx position {state_dict} is outside the stream.")
        self.epoch, self.batch = int(state_dict["epoch"]), int(state_dict["batch"])


def lm_nll_sum(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log pi(x_t | x_<t) over the text's predicted tokens, their count): logits `(B, L, V)` at temperature
    1, `input_ids` / `attention_mask` `(B, L)`; token t >= 1 is predicted by position t - 1."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nll_sum = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100
    )
    return nll_sum, (targets != -100).sum()


def check_ptx_arguments(ptx_coef: float, ptx_dataset) -> None:
    """`ptx_coef` and the trainer's `ptx_dataset` come together: one without the other is a mistake."""
    if ptx_coef > 0 and ptx_dataset is None:
        raise ValueError(
            f"`ptx_coef` is {ptx_coef} and no `ptx_dataset` was given; valid: pass `ptx_dataset` (plain text in a "
            f"`{TEXT_FIELD}` column) to the trainer, or set ptx_coef=0.0."
        )
    if ptx_coef == 0 and ptx_dataset is not None:
        raise ValueError(
            "a `ptx_dataset` was given and `ptx_coef` is 0.0, so it would never be used; valid: ptx_coef > 0 (the "
            "weight of its language-model loss, InstructGPT's gamma), or no ptx_dataset."
        )
