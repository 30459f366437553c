r"""TTRL: majority vote as a pseudo-label reward for unlabeled prompts (arXiv 2504.16084).

For each prompt, the G sampled completions are reduced to answers (`extract_answer`), the most common answer of the
group becomes the pseudo-label, and each completion is rewarded 1.0 when its answer equals the label, else 0.0. The
paper votes over N = 64 completions at temperature 1.0 and trains on 32 of them (the authors' code keeps the first
32 of each prompt's 64, `select_top_k_per_prompt` in PRIME-RL/TTRL `verl/trainer/ppo/ttrl_utils.py`); with
`GRPOConfig.ttrl_num_votes` the trainer generates the extra votes and passes them in the `ttrl_votes` column.

Answers are extracted and compared by `math_verify` (the `math-verify` package, `pip install trl-plus[math]`, the
engine of `trl.rewards.accuracy_reward`): the extraction is its `parse` (boxed answers first, then LaTeX and plain
expressions), and two votes count together when `math_verify.verify` finds them equivalent (`1/2` and `0.5`, `x+1`
and `1+x`). Without it, a small fallback: the last `\boxed{}`, else the last number, compared by `normalize_answer`
(numbers canonicalized exactly, LaTeX spacing stripped). The two differ where math_verify reads more: several boxes
(`\boxed{1}, \boxed{2}` is the set `1,2`, the fallback takes the last box), expressions (`10-3` is `10-3`, i.e. 7, the
fallback takes the last number, 3), "the answer is 7 ... maybe 8" (7, the fallback 8), and symbolic equivalence.

In TRL, every process scores only its own completions and a group can straddle processes; `MajorityVoteReward`
therefore takes a `gather_fn` (e.g. `accelerate.utils.gather_object`) to vote over the whole group.
"""

import functools
import hashlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

from .text import message_text

try:  # the `math` extra: answer extraction and symbolic equivalence ("\frac{1}{2}" == "0.5", "x+1" == "1+x")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None

GROUND_TRUTH_COLUMNS = ("label", "answer", "solution")
VOTES_COLUMN = "ttrl_votes"  # per row: completions of the row's prompt that vote but are not trained on
TIE_RULES = ("first", "none")

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


def _math_verify_timeouts() -> int | None:
    """math_verify's timeouts use `signal.alarm`, which only works in the main thread: off elsewhere (as in
    `trl.rewards.accuracy_reward`), with its warnings about that silenced."""
    if threading.current_thread() is threading.main_thread():
        return 5
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None


def fallback_extract_answer(text: str) -> str | None:
    r"""The answer without math_verify: the content of the last `\boxed{...}`, else the last number, else None.

    Nested braces inside the box are kept; the last number may be negative or decimal, and thousands commas are
    removed (`1,234` -> `1234`). An empty box counts as no box.

    >>> fallback_extract_answer(r"so x = \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> fallback_extract_answer("first 3, then -1,250.5 apples")
    '-1250.5'
    >>> fallback_extract_answer("no answer here") is None
    True
    """
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


def extract_answer(text: str) -> str | None:
    r"""The final answer of a completion, as text: math_verify's extraction when installed, else the fallback.

    math_verify (`parse` with boxed answers first, then LaTeX and plain expressions) returns the matched text;
    `fallback_extract_answer` the last box or number. Any math_verify failure counts as no answer.

    >>> extract_answer(r"so x = \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> extract_answer("no answer here") is None
    True
    """
    if _mv_parse is None:
        return fallback_extract_answer(text)
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    try:
        parsed = _mv_parse(text, extraction_config=config, parsing_timeout=_math_verify_timeouts())
    except Exception:  # a parser or timeout error is no answer, never a crashed training step
        return None
    if len(parsed) < 2:  # [expression, matched text], or [] when nothing was found
        return None
    return str(parsed[1]).strip() or None


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


@functools.lru_cache(maxsize=4096)
def _parsed_answer(answer: str) -> list:
    """math_verify's parse of one answer written as inline LaTeX; cached, since a vote compares each answer with
    several others. [] when it cannot be parsed."""
    try:
        return _mv_parse(f"${answer}$", parsing_timeout=_math_verify_timeouts())
    except Exception:
        return []


def math_equal(label: str, answer: str) -> bool:
    """`normalized_equal`, or else equivalence by `math_verify.verify` when it is installed.

    `math_verify` treats `label` as the gold answer. Any `math_verify` failure counts as "not equal".
    """
    if normalized_equal(label, answer):
        return True
    if _mv_parse is None:
        return False
    gold, target = _parsed_answer(label), _parsed_answer(answer)
    if not gold or not target:
        return False
    try:
        return bool(_mv_verify(gold, target, timeout_seconds=_math_verify_timeouts()))
    except Exception:  # a timeout or grader error is a mismatch, never a crashed training step
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


class GroupVote(NamedTuple):
    """One group's vote: its label (None: no answer, or a tie under `ties="none"`), the class each distinct vote
    joined (the class is named by its first vote), whether the top classes tied, and the label's share of the group."""

    label: str | None
    class_of: dict
    tied: bool
    majority_ratio: float


def vote_groups(
    answers: Sequence[str | None],
    group_ids: Sequence[Hashable],
    equivalent: Callable[[str, str], bool] | None = None,
    ties: str = "first",
) -> dict[Hashable, GroupVote]:
    """The vote of every group (TTRL, arXiv 2504.16084): `answers` and `group_ids` are `(N,)`, rows with equal group
    ids form a group wherever they are, and None never votes.

    Distinct answers join the first class whose first answer is `equivalent` to them (string equality when None),
    in order of first occurrence; the label is the largest class. On a tie between the largest classes, `ties`
    decides: `first` gives the class that occurred first (as `Counter.most_common` in the authors' code), `none`
    gives no label, so position never decides. `majority_ratio` is the largest class's votes over the group's rows.

    >>> vote = vote_groups(["1/2", "0.5", "3", None], [0] * 4, equivalent=lambda a, b: {a, b} == {"1/2", "0.5"})
    >>> vote[0].label, vote[0].class_of, vote[0].tied, vote[0].majority_ratio
    ('1/2', {'1/2': '1/2', '0.5': '1/2', '3': '3'}, False, 0.5)
    """
    if len(answers) != len(group_ids):
        raise ValueError(f"answers and group_ids must have the same length, got {len(answers)} and {len(group_ids)}.")
    if ties not in TIE_RULES:
        raise ValueError(f"`ties` is {ties!r}; valid: {', '.join(map(repr, TIE_RULES))}.")
    counts: dict[Hashable, dict[str, int]] = {}
    sizes: dict[Hashable, int] = {}
    for answer, group in zip(answers, group_ids, strict=True):
        sizes[group] = sizes.get(group, 0) + 1
        group_counts = counts.setdefault(group, {})
        if answer is not None:
            group_counts[answer] = group_counts.get(answer, 0) + 1
    votes = {}
    for group, group_counts in counts.items():
        class_of: dict[str, str] = {}
        class_votes: dict[str, int] = {}  # insertion order: first occurrence
        for answer, count in group_counts.items():
            joined = (name for name in class_votes if equivalent is not None and equivalent(name, answer))
            first = next(joined, answer)
            class_of[answer] = first
            class_votes[first] = class_votes.get(first, 0) + count
        top = max(class_votes.values(), default=0)
        leaders = [name for name, count in class_votes.items() if count == top]
        tied = len(leaders) > 1
        label = None if not leaders or (tied and ties == "none") else leaders[0]
        votes[group] = GroupVote(label, class_of, tied, top / sizes[group])
    return votes


def majority_vote_labels(
    answers: Sequence[str | None],
    group_ids: Sequence[Hashable],
    equivalent: Callable[[str, str], bool] | None = None,
    ties: str = "first",
) -> list[str | None]:
    """Per-row pseudo-label: the label of the row's group (`vote_groups`).

    Answers are compared as strings unless `equivalent` is given (normalize them first). A tie goes to the answer
    that occurs first in the group (`ties="first"`) or to no label (`ties="none"`); a group with no answer gets None.

    >>> majority_vote_labels(["1", "2", "2", None, "7", "8"], [0, 0, 0, 1, 1, 1])
    ['2', '2', '2', '7', '7', '7']
    >>> majority_vote_labels(["1", "2", "2", None, "7", "8"], [0, 0, 0, 1, 1, 1], ties="none")
    ['2', '2', '2', None, None, None]
    """
    votes = vote_groups(answers, group_ids, equivalent, ties)
    return [votes[group].label for group in group_ids]


def prompt_key(prompt: Any) -> str:
    """A digest of the prompt that is equal on every process for equal prompts (Python's `hash` is salted)."""
    serialized = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)
    return hashlib.sha256(serialized.encode("utf-8")).hexdigest()


class MajorityVoteReward:
    r"""TTRL majority-vote reward (arXiv 2504.16084): 1.0 when a completion's answer equals its group's majority.

    Called by TRL as `func(prompts=..., completions=..., completion_ids=..., **columns)`; `completions` are strings or
    chat-style lists of messages. Each answer is `extractor(text)` and votes as `normalize_answer(answer)`;
    completions of equal prompts form one group, wherever they sit in the batch, and equivalent votes (`equivalent`:
    `math_equal`, i.e. math_verify when installed) count together (`vote_groups`). A completion is rewarded 1.0 when
    its vote is in the label's class, else 0.0, and 0.0 when it has no answer; under `ties="none"` a group whose top
    answers tie has no label and its completions get None (no reward: to TRL, not scored by this function).

    A `ttrl_votes` column (the trainer fills it when `GRPOConfig.ttrl_num_votes` is set) gives each row a list of
    further completions of its prompt: they vote, and get no reward, as the paper votes over more completions than
    it trains on.

    Args:
        extractor: maps a completion's text to its answer, or None. Defaults to `extract_answer`.
        group_size: if set, every group (after gathering) must hold a multiple of `group_size` completions, which
            catches a group split across processes without `gather_fn`; without `prompts`, consecutive runs of
            `group_size` completions form the groups (single process only). Extra votes are not counted here.
        gather_fn: takes this process's list and returns the concatenation of every process's list, in rank order
            (e.g. `accelerate.utils.gather_object`). With it, the vote is over the whole group even when it straddles
            processes; every process must then call the reward the same number of times (TRL does). None: one process.
        equivalent: `(label, answer) -> bool`; defaults to `math_equal`. For answers that are not math (words,
            letters), pass `operator.eq`: math_verify reads `abc` and `cba` as the same product.
        ties: `first` (the tied answer that occurs first is the label, as in the authors' code) or `none` (no label).

    The reward never reads ground-truth labels. When a `label`, `answer` or `solution` column is present and TRL
    passes `log_metric`, it logs `ttrl/label_accuracy` (fraction of groups whose majority label is equivalent to the
    ground truth; a group without a label counts as wrong); with `log_metric` it always logs `ttrl/majority_ratio`
    (mean over groups of the label's votes divided by the group's votes, extra votes included) and
    `ttrl/tied_groups` (fraction of groups whose top answers tie). All are over the gathered groups, so every process
    logs the same values.

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
        ties: str = "first",
    ):
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}.")
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None, got {group_size}.")
        if ties not in TIE_RULES:
            raise ValueError(f"`ties` is {ties!r}; valid: {', '.join(map(repr, TIE_RULES))}.")
        self.extractor = extractor
        self.group_size = group_size
        self.gather_fn = gather_fn
        self.equivalent = equivalent
        self.ties = ties

    def _vote(self, completion: Any) -> str | None:
        answer = self.extractor(message_text(completion, roles=("assistant",)))
        return normalize_answer(answer) if answer is not None else None

    def __call__(self, completions: list, prompts: list | None = None, **kwargs) -> list[float | None]:
        votes = [self._vote(completion) for completion in completions]
        keys = self._group_keys(len(completions), prompts)
        truth_column = next((kwargs[name] for name in GROUND_TRUTH_COLUMNS if kwargs.get(name) is not None), None)
        truths = [None] * len(completions) if truth_column is None else list(truth_column)
        extra_votes = kwargs.get(VOTES_COLUMN) or [()] * len(completions)
        if len(extra_votes) != len(completions):
            raise ValueError(f"Got {len(extra_votes)} rows of {VOTES_COLUMN} for {len(completions)} completions.")

        # (group, vote, ground truth, trained): the trained rows, then each row's extra votes.
        records = [(key, vote, truth, True) for key, vote, truth in zip(keys, votes, truths, strict=True)]
        for key, truth, row_votes in zip(keys, truths, extra_votes, strict=True):
            records += [(key, self._vote(completion), truth, False) for completion in row_votes]
        if self.gather_fn is not None:
            records = list(self.gather_fn(records))  # every process's records, in rank order
        elif len(completions) > 0:
            self._warn_if_distributed()

        group_votes = vote_groups([r[1] for r in records], [r[0] for r in records], self.equivalent, self.ties)
        self._check_group_sizes([key for key, _, _, trained in records if trained])

        rewards: list[float | None] = []
        for key, vote in zip(keys, votes, strict=True):
            group = group_votes[key]
            if group.label is None and group.tied:
                rewards.append(None)  # ties="none": no label, no reward
            else:
                in_label_class = vote is not None and group.label is not None and group.class_of[vote] == group.label
                rewards.append(1.0 if in_label_class else 0.0)

        log_metric = kwargs.get("log_metric")
        if log_metric is not None and records:
            self._log_metrics(log_metric, records, group_votes, has_truth=truth_column is not None)
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

    def _log_metrics(self, log_metric: Callable[[str, float], None], records: list, group_votes: dict, has_truth):
        log_metric("ttrl/majority_ratio", sum(vote.majority_ratio for vote in group_votes.values()) / len(group_votes))
        log_metric("ttrl/tied_groups", sum(vote.tied for vote in group_votes.values()) / len(group_votes))
        if has_truth:
            first_truth: dict = {}  # the ground truth of each group's first row
            for key, _, truth, _ in records:
                first_truth.setdefault(key, truth)
            scored = [
                (group_votes[key].label, _ground_truth_answer(truth))
                for key, truth in first_truth.items()
                if _ground_truth_answer(truth) is not None
            ]
            if scored:
                correct = sum(label is not None and self.equivalent(truth, label) for label, truth in scored)
                log_metric("ttrl/label_accuracy", correct / len(scored))

    def __repr__(self) -> str:
        extractor = getattr(self.extractor, "__name__", repr(self.extractor))
        return (
            f"{type(self).__name__}(extractor={extractor}, group_size={self.group_size}, gather_fn={self.gather_fn}, "
            f"ties={self.ties!r})"
        )


majority_vote_reward = MajorityVoteReward()
"""A ready single-process TTRL reward: pass it in `reward_funcs`. For several processes, build
`MajorityVoteReward(gather_fn=accelerate.utils.gather_object)`."""
