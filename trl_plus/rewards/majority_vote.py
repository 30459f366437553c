r"""TTRL: majority vote as a pseudo-label reward for unlabeled prompts (arXiv 2504.16084).

For each prompt, the G sampled completions are reduced to answers (`extract_answer`), the most common answer of the
group becomes the pseudo-label, and each completion is rewarded 1.0 when its answer equals the label, else 0.0. The
paper samples N = 64 completions at temperature 1.0 for the vote and trains with GRPO on the result.

In TRL, every process scores only its own completions and a group can straddle processes; `MajorityVoteReward`
therefore takes a `gather_fn` (e.g. `accelerate.utils.gather_object`) to vote over the whole group.
"""

import hashlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any

try:  # optional: symbolic equivalence ("\frac{1}{2}" == "0.5", "x+1" == "1+x")
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None

GROUND_TRUTH_COLUMNS = ("label", "answer", "solution")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to the digits or decimal point before it: 12, -3, 4.5, .5, 1,234,567.89 (thousands commas).
_NUMBER = re.compile(r"(?<![\d.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH = re.compile(r"^(-?\d+)/(-?\d+)$")
_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction and normalization
# ---------------------------------------------------------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    """Content of the last `\boxed{...}` (or `\fbox{...}`) whose braces close, nested braces included."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos].strip()
    return None


def extract_answer(text: str) -> str | None:
    r"""The final answer of a completion: the content of the last `\boxed{...}`, else the last number, else None.

    Nested braces inside the box are kept; the last number may be negative or decimal, and thousands commas are
    removed (`1,234` -> `1234`). An empty box counts as no box.

    >>> extract_answer(r"so x = \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> extract_answer("first 3, then -1,250.5 apples")
    '-1250.5'
    >>> extract_answer("no answer here") is None
    True
    """
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


def _canonical_number(value: Fraction) -> str:
    """`2`, `0.5`, `-1.25`, or `1/3` when the decimal expansion does not terminate."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:  # terminating decimal
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _as_number(answer: str) -> Fraction | None:
    """The exact value of a plain number, `a/b` or `\frac{a}{b}`; None for anything else."""
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    if _DECIMAL.match(answer):
        return Fraction(Decimal(answer))
    for pattern in (_SLASH, _FRAC):
        match = pattern.match(answer)
        if match:
            groups = match.groups()
            sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
            numerator, denominator = int(groups[-2]), int(groups[-1])
            if denominator == 0:
                return None
            return sign * Fraction(numerator, denominator)
    return None


def normalize_answer(answer: str) -> str:
    r"""Canonical form of an answer, used as its vote: equal strings are the same vote.

    Strips `$`, whitespace, a trailing period, `\left`/`\right`, LaTeX spacing (`\!`, `\,`, `\;`), and unifies
    `\dfrac`/`\tfrac` to `\frac`; numbers are written canonically (`2.0` -> `2`, `1,000` -> `1000`, `\frac{1}{2}` ->
    `0.5`, `2/6` -> `1/3`).

    >>> [normalize_answer(a) for a in ["2.0", "$1,000$", r"\dfrac{1}{2}", "x + 1."]]
    ['2', '1000', '0.5', 'x+1']
    """
    text = answer.strip().strip("$")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\dfrac", "\\frac")):
        text = text.replace(old, new)
    text = text.replace("\\tfrac", "\\frac")
    text = re.sub(r"\s+", "", text).rstrip(".")
    number = _as_number(text)
    return _canonical_number(number) if number is not None else text


def normalized_equal(label: str, answer: str) -> bool:
    """Whether two answers have the same `normalize_answer` form (the fallback when `math_verify` is missing).

    >>> normalized_equal("2", "2.00"), normalized_equal("0.5", "1/2"), normalized_equal("2", "3")
    (True, True, False)
    """
    return normalize_answer(label) == normalize_answer(answer)


def math_equal(label: str, answer: str) -> bool:
    """`normalized_equal`, or else symbolic equivalence through `math_verify` when it is installed.

    `math_verify` treats `label` as the gold answer; its timeouts use `signal.alarm`, so outside the main thread they
    are disabled (as in `trl.rewards.accuracy_reward`). Any `math_verify` failure counts as "not equal".
    """
    if normalized_equal(label, answer):
        return True
    if _mv_parse is None:
        return False
    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout = 5 if in_main_thread else None
    if not in_main_thread:
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    try:
        gold = _mv_parse(f"${label}$", parsing_timeout=timeout)
        target = _mv_parse(f"${answer}$", parsing_timeout=timeout)
        return bool(gold and target and _mv_verify(gold, target, timeout_seconds=timeout))
    except Exception:  # a parser or timeout error is a mismatch, never a crashed training step
        return False


def _ground_truth_answer(value: Any) -> str | None:
    r"""The answer inside a ground-truth cell: its `\boxed{}` content, the text after GSM8K's `####`, or the text."""
    if value is None:
        return None
    text = str(value)
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


# ---------------------------------------------------------------------------------------------------------------------
# The vote
# ---------------------------------------------------------------------------------------------------------------------


def majority_vote_labels(answers: Sequence[str | None], group_ids: Sequence[Hashable]) -> list[str | None]:
    """Per-row pseudo-label: the most common non-None answer of the row's group (TTRL, arXiv 2504.16084).

    `answers` and `group_ids` are `(N,)`; rows with equal group ids form a group, wherever they are. Answers are
    compared as strings (normalize them first). A tie goes to the answer that occurs first in the group; a group with
    no answer gets None.

    >>> majority_vote_labels(["1", "2", "2", None, "7", "8"], [0, 0, 0, 1, 1, 1])
    ['2', '2', '2', '7', '7', '7']
    """
    if len(answers) != len(group_ids):
        raise ValueError(f"answers and group_ids must have the same length, got {len(answers)} and {len(group_ids)}.")
    votes: dict[Hashable, dict[str, int]] = {}
    for answer, group in zip(answers, group_ids, strict=True):
        counts = votes.setdefault(group, {})
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    # max() returns the first maximal key in insertion order, i.e. the answer that occurred first.
    label = {group: (max(counts, key=counts.__getitem__) if counts else None) for group, counts in votes.items()}
    return [label[group] for group in group_ids]


def _completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the assistant contents of a chat-style list of messages."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else list(completion)
    parts = []
    for message in messages:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # multimodal content parts: [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(str(content))
    return "\n".join(parts)


def prompt_key(prompt: Any) -> str:
    """A digest of the prompt that is equal on every process for equal prompts (Python's `hash` is salted)."""
    serialized = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)
    return hashlib.sha256(serialized.encode("utf-8")).hexdigest()


class MajorityVoteReward:
    r"""TTRL majority-vote reward (arXiv 2504.16084): 1.0 when a completion's answer equals its group's majority.

    Called by TRL as `func(prompts=..., completions=..., completion_ids=..., **columns)`; `completions` are strings or
    chat-style lists of messages. Each answer is `extractor(text)` and votes as `normalize_answer(answer)`;
    completions of equal prompts form one group, wherever they sit in the batch. The label is the group's most common
    non-None vote (ties: first occurrence); a completion is rewarded 1.0 when its answer is equivalent to the label
    (`math_equal`: `math_verify` when installed, else `normalized_equal`), else 0.0, and 0.0 when it has no answer.

    Args:
        extractor: maps a completion's text to its answer, or None. Defaults to `extract_answer`.
        group_size: if set, every group (after gathering) must hold a multiple of `group_size` completions, which
            catches a group split across processes without `gather_fn`; without `prompts`, consecutive runs of
            `group_size` completions form the groups (single process only).
        gather_fn: takes this process's list and returns the concatenation of every process's list, in rank order
            (e.g. `accelerate.utils.gather_object`). With it, the vote is over the whole group even when it straddles
            processes; every process must then call the reward the same number of times (TRL does). None: one process.
        equivalent: `(label, answer) -> bool`; defaults to `math_equal`.

    The reward never reads ground-truth labels. When a `label`, `answer` or `solution` column is present and TRL
    passes `log_metric`, it logs `ttrl/label_accuracy` (fraction of groups whose majority label is equivalent to the
    ground truth); with `log_metric` it always logs `ttrl/majority_ratio` (mean over groups of the majority answer's
    votes divided by the group's completions). Both are over the gathered groups, so every process logs the same value.

    >>> reward = MajorityVoteReward()
    >>> reward(prompts=["q"] * 4, completions=[r"\boxed{4}", "so 4.0", "5", "no idea"])
    [1.0, 1.0, 0.0, 0.0]
    """

    __name__ = "majority_vote_reward"

    def __init__(
        self,
        extractor: Callable[[str], str | None] = extract_answer,
        group_size: int | None = None,
        gather_fn: Callable[[list], list] | None = None,
        equivalent: Callable[[str, str], bool] = math_equal,
    ):
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}.")
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None, got {group_size}.")
        self.extractor = extractor
        self.group_size = group_size
        self.gather_fn = gather_fn
        self.equivalent = equivalent

    def __call__(self, completions: list, prompts: list | None = None, **kwargs) -> list[float]:
        answers = [self.extractor(_completion_text(completion)) for completion in completions]
        votes = [normalize_answer(answer) if answer is not None else None for answer in answers]
        keys = self._group_keys(len(completions), prompts)
        truth_column = next((kwargs[name] for name in GROUND_TRUTH_COLUMNS if kwargs.get(name) is not None), None)
        truths = [None] * len(completions) if truth_column is None else list(truth_column)

        records = list(zip(keys, votes, truths, strict=True))
        if self.gather_fn is not None:
            records = list(self.gather_fn(records))  # every process's (group, vote, truth), in rank order
        elif len(completions) > 0:
            self._warn_if_distributed()

        all_keys = [record[0] for record in records]
        all_labels = majority_vote_labels([record[1] for record in records], all_keys)
        label_of = dict(zip(all_keys, all_labels, strict=True))  # this process's rows find their group's label by key
        self._check_group_sizes(all_keys)

        rewards = []
        for key, answer in zip(keys, answers, strict=True):
            label = label_of[key]
            matched = answer is not None and label is not None and self.equivalent(label, answer)
            rewards.append(1.0 if matched else 0.0)

        log_metric = kwargs.get("log_metric")
        if log_metric is not None and records:
            self._log_metrics(log_metric, records, label_of, has_truth=truth_column is not None)
        return rewards

    def _group_keys(self, num_completions: int, prompts: list | None) -> list:
        if prompts is not None:
            if len(prompts) != num_completions:
                raise ValueError(f"Got {len(prompts)} prompts for {num_completions} completions.")
            return [prompt_key(prompt) for prompt in prompts]
        if self.group_size is None:
            raise ValueError("MajorityVoteReward needs `prompts` (as TRL passes them) or `group_size` to form groups.")
        if self.gather_fn is not None:
            raise ValueError("With gather_fn, groups must be identified by `prompts`: positions are per-process.")
        return [index // self.group_size for index in range(num_completions)]

    def _check_group_sizes(self, keys: list) -> None:
        if self.group_size is None:
            return
        counts: dict = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        partial = sorted({count for count in counts.values() if count % self.group_size})
        if partial:
            hint = "" if self.gather_fn is not None else " A group split across processes needs gather_fn."
            raise ValueError(
                f"Groups of {partial} completions are not multiples of group_size={self.group_size}: "
                f"the vote would be over part of a group.{hint}"
            )

    def _warn_if_distributed(self) -> None:
        try:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        except Exception:  # pragma: no cover - torch is a dependency of TRL
            distributed = False
        if distributed and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(
                "MajorityVoteReward has no gather_fn in a multi-process run: groups that straddle processes are "
                "voted on in parts. Pass gather_fn=accelerate.utils.gather_object.",
                stacklevel=3,
            )

    def _log_metrics(self, log_metric: Callable[[str, float], None], records: list, label_of: dict, has_truth: bool):
        groups: dict = {}  # key -> (votes for the label, group size, ground truth of the group's first row)
        for key, vote, truth in records:
            hits, size, first_truth = groups.get(key, (0, 0, truth))
            hits += int(vote is not None and vote == label_of[key])
            groups[key] = (hits, size + 1, first_truth)
        log_metric("ttrl/majority_ratio", sum(hits / size for hits, size, _ in groups.values()) / len(groups))
        if has_truth:
            scored = [
                (label_of[key], _ground_truth_answer(truth))
                for key, (_, _, truth) in groups.items()
                if _ground_truth_answer(truth) is not None
            ]
            if scored:
                correct = sum(label is not None and self.equivalent(truth, label) for label, truth in scored)
                log_metric("ttrl/label_accuracy", correct / len(scored))

    def __repr__(self) -> str:
        extractor = getattr(self.extractor, "__name__", repr(self.extractor))
        return (
            f"{type(self).__name__}(extractor={extractor}, group_size={self.group_size}, gather_fn={self.gather_fn})"
        )


majority_vote_reward = MajorityVoteReward()
"""A ready single-process TTRL reward: pass it in `reward_funcs`. For several processes, build
`MajorityVoteReward(gather_fn=accelerate.utils.gather_object)`."""
