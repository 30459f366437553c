r"""Reward functions: DAPO overlong shaping (arXiv 2503.14476) and TTRL majority vote (arXiv 2504.16084).

Golden values are derived by hand in the comments.
"""

import pickle

import pytest
from trl.rewards import get_soft_overlong_punishment
from trl.trainer.utils import get_callable_name

import trl_plus.rewards.majority_vote as majority_vote_module
from trl_plus.rewards import (
    GroupVote,
    MajorityVoteReward,
    OverlongPenalty,
    extract_answer,
    fallback_extract_answer,
    majority_vote_labels,
    majority_vote_reward,
    math_equal,
    normalize_answer,
    normalized_equal,
    overlong_penalty,
    vote_groups,
)


@pytest.fixture
def no_math_verify(monkeypatch):
    """Force the fallback equivalence (normalized string equality), whether or not math_verify is installed."""
    monkeypatch.setattr(majority_vote_module, "_mv_parse", None)
    monkeypatch.setattr(majority_vote_module, "_mv_verify", None)


def ids(*lengths):
    return [[7] * n for n in lengths]


# ---------------------------------------------------------------------------------------------------------------------
# DAPO overlong penalty
# ---------------------------------------------------------------------------------------------------------------------


def test_overlong_golden_values():
    # L_max = 20, L_cache = 5: no penalty up to L_max - L_cache = 15, linear within (15, 20], -1 beyond 20.
    #   len 0, 15 -> 0;  len 16 -> (15 - 16) / 5 = -0.2;  len 17 -> (15 - 17) / 5 = -0.4;
    #   len 20 -> (15 - 20) / 5 = -1;  len 21, 100 -> -1
    penalty = overlong_penalty(max_completion_length=20, overlong_buffer_len=5)
    assert isinstance(penalty, OverlongPenalty)
    assert penalty(completion_ids=ids(0, 15, 16, 17, 20, 21, 100)) == pytest.approx(
        [0.0, 0.0, -0.2, -0.4, -1.0, -1.0, -1.0]
    )


def test_overlong_factor_scales_the_penalty():
    # factor 0.5: len 17 -> 0.5 * -0.4 = -0.2; len 21 -> 0.5 * -1 = -0.5; len 10 -> 0.
    penalty = OverlongPenalty(20, 5, overlong_penalty_factor=0.5)
    assert penalty(completion_ids=ids(10, 17, 21)) == pytest.approx([0.0, -0.2, -0.5])
    # factor 0 switches the shaping off (and gives 0.0, not -0.0).
    assert [str(r) for r in OverlongPenalty(20, 5, 0.0)(completion_ids=ids(17, 21))] == ["0.0", "0.0"]


def test_overlong_buffer_equal_to_max_length():
    # L_max = L_cache = 4: the penalty starts at length 0: len 2 -> (0 - 2) / 4 = -0.5; len 4 -> -1; len 5 -> -1.
    assert OverlongPenalty(4, 4)(completion_ids=ids(0, 2, 4, 5)) == pytest.approx([0.0, -0.5, -1.0, -1.0])


def test_overlong_factor_one_equals_trl():
    # With factor 1 the rewards are exactly trl.rewards.get_soft_overlong_punishment's.
    lengths = list(range(0, 30))
    trl_rewards = get_soft_overlong_punishment(max_completion_len=24, soft_punish_cache=6)(ids(*lengths))
    assert OverlongPenalty(24, 6)(completion_ids=ids(*lengths)) == trl_rewards
    assert trl_rewards[20] == pytest.approx(-(20 - 18) / 6)  # guard: the comparison is not between empty lists


def test_overlong_follows_trl_reward_protocol():
    penalty = OverlongPenalty(20, 5)
    # TRL calls reward funcs with keyword arguments only, plus dataset columns and extras.
    rewards = penalty(
        prompts=["a", "b"],
        completions=["x" * 17, "y"],
        completion_ids=ids(17, 1),
        trainer_state=None,
        log_metric=lambda name, value: None,
        solution=["1", "2"],
    )
    assert rewards == pytest.approx([-0.4, 0.0])
    assert penalty.__name__ == "overlong_penalty"
    assert get_callable_name(penalty) == "overlong_penalty"


def test_overlong_pickle_round_trip():
    penalty = OverlongPenalty(20, 5, overlong_penalty_factor=0.5)
    restored = pickle.loads(pickle.dumps(penalty))
    assert restored is not penalty
    assert (restored.max_completion_length, restored.overlong_buffer_len, restored.overlong_penalty_factor) == (
        20,
        5,
        0.5,
    )
    assert restored(completion_ids=ids(15, 17, 21)) == penalty(completion_ids=ids(15, 17, 21)) == [0.0, -0.2, -0.5]
    assert restored.__name__ == "overlong_penalty"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_completion_length": 20, "overlong_buffer_len": 0}, "overlong_buffer_len"),
        ({"max_completion_length": 20, "overlong_buffer_len": -3}, "overlong_buffer_len"),
        ({"max_completion_length": 20, "overlong_buffer_len": 21}, "overlong_buffer_len"),
        ({"max_completion_length": 20, "overlong_buffer_len": 2.5}, "overlong_buffer_len"),
        ({"max_completion_length": 0, "overlong_buffer_len": 1}, "max_completion_length"),
        ({"max_completion_length": 20, "overlong_buffer_len": 5, "overlong_penalty_factor": -0.1}, "factor"),
        ({"max_completion_length": 20, "overlong_buffer_len": 5, "overlong_penalty_factor": float("nan")}, "factor"),
    ],
)
def test_overlong_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OverlongPenalty(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction and normalization
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is \boxed{42}.", "42"),
        (r"so \boxed{\frac{1}{\sqrt{2}}} it is", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"first \boxed{1}, finally \boxed{ 2 }", "2"),  # the last box, stripped
        (r"\boxed{7}; check: 3 + 4 = 7.5", "7"),  # a box wins over a later number
        (r"\boxed{3 and then 5", "5"),  # an unclosed box falls back to the last number
        (r"\boxed{} and 9", "9"),  # an empty box counts as no box
        ("1 then 2 then 3", "3"),
        ("so x = -12", "-12"),
        ("pi is about 3.14.", "3.14"),
        ("total: 1,234,567 dollars", "1234567"),
        ("a loss of -1,250.5", "-1250.5"),
        ("10-3", "3"),  # a minus glued to a digit is subtraction, not a sign
        ("about .5 of it", ".5"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_fallback_extract_answer(no_math_verify, text, expected):
    assert extract_answer(text) == fallback_extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "math_verify_answer", "fallback_answer"),
    [
        # Where the engines agree.
        (r"The answer is \boxed{42}.", "42", "42"),
        (r"so \boxed{\frac{1}{\sqrt{2}}} it is", r"\frac{1}{\sqrt{2}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{7}; check: 3 + 4 = 7.5", "7", "7"),
        ("a loss of -1,250.5", "-1250.5", "-1250.5"),
        ("no digits at all", None, None),
        # Where they differ: math_verify reads several boxes as a set, an expression as a whole, an answer phrase
        # before a later number, and writes decimals with their leading zero.
        (r"first \boxed{1}, finally \boxed{ 2 }", "1,2", "2"),
        ("10-3", "10-3", "3"),
        ("The answer is 7. I am not sure, maybe 8", "7", "8"),
        ("about .5 of it", "0.5", ".5"),
    ],
)
def test_math_verify_extraction_and_where_it_differs(text, math_verify_answer, fallback_answer):
    pytest.importorskip("math_verify")
    assert extract_answer(text) == math_verify_answer
    assert fallback_extract_answer(text) == fallback_answer


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("2", "2"),
        ("2.0", "2"),
        ("-2.50", "-2.5"),
        ("1,000", "1000"),
        (".5", "0.5"),
        ("$42$", "42"),
        (r"\frac{1}{2}", "0.5"),
        (r"-\dfrac{3}{4}", "-0.75"),
        ("2/6", "1/3"),
        (r"\frac{1}{3}", "1/3"),
        ("-0.0", "0"),
        ("x + 1.", "x+1"),
        (r"\left( 1, 2 \right)", "(1,2)"),
    ],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


def test_fallback_equivalence_is_numeric_not_symbolic(no_math_verify):
    assert math_equal("2", "2.0") is True
    assert math_equal("0.5", r"\frac{1}{2}") is True
    assert math_equal("1000", "1,000") is True
    assert math_equal("2", "3") is False
    assert math_equal("x+1", "1+x") is False  # needs symbolic equivalence: only with math_verify
    assert normalized_equal("x+1", "x + 1") is True


def test_math_verify_equivalence_is_symbolic():
    pytest.importorskip("math_verify")
    assert math_equal("x+1", "1+x") is True
    assert math_equal(r"\sqrt{2}", "2^{1/2}") is True
    assert math_equal("3", "4") is False
    # The reward: votes "x+1" (twice) and "1+x" (once) -> label "x+1"; "1+x" is equivalent -> rewarded too.
    completions = [r"\boxed{x+1}", r"\boxed{x+1}", r"\boxed{1+x}", r"\boxed{x+2}"]
    assert MajorityVoteReward()(prompts=["q"] * 4, completions=completions) == [1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# Majority vote
# ---------------------------------------------------------------------------------------------------------------------


def test_majority_vote_labels_with_ties_and_empty_groups():
    # group 0: "3", "5", "5", "3" -> tie 2-2, "3" occurs first -> "3"
    # group 1: "5", "3", "3", "5" -> tie 2-2, "5" occurs first -> "5"
    # group 2: None, "9", None -> "9" (None never votes)
    # group 3: None, None -> None
    answers = ["3", "5", "5", "3", "5", "3", "3", "5", None, "9", None, None, None]
    group_ids = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert majority_vote_labels(answers, group_ids) == ["3"] * 4 + ["5"] * 4 + ["9"] * 3 + [None] * 2


def test_majority_vote_labels_groups_by_id_not_position():
    # Interleaved groups: group 7 = rows 0, 2, 4 -> "1", "2", "2" -> "2"; group 3 = rows 1, 3 -> "4", "4" -> "4".
    assert majority_vote_labels(["1", "4", "2", "4", "2"], [7, 3, 7, 3, 7]) == ["2", "4", "2", "4", "2"]
    with pytest.raises(ValueError, match="same length"):
        majority_vote_labels(["1"], [0, 0])


def test_majority_vote_reward_basic(no_math_verify):
    # answers 4, 4.0, 5, None, 4 -> votes "4" x3, "5" x1 -> label "4": rewards 1, 1, 0, 0 (no answer), 1
    completions = [r"\boxed{4}", "I get 4.0", r"\boxed{5}", "I don't know", "= 4"]
    assert majority_vote_reward(prompts=["q"] * 5, completions=completions) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_majority_vote_reward_tie_goes_to_first_answer(no_math_verify):
    # 2-2 ties: the answer that occurs first wins, whatever its value or its last position:
    #   3, 5, 5, 3 -> "3" (not the larger 5)   -> 1, 0, 0, 1
    #   5, 3, 3, 5 -> "5" (not the smaller 3)  -> 1, 0, 0, 1
    #   3, 5, 3, 5 -> "3" (not the last, 5)    -> 1, 0, 1, 0
    for completions, expected in (
        (["3", "5", "5", "3"], [1.0, 0.0, 0.0, 1.0]),
        (["5", "3", "3", "5"], [1.0, 0.0, 0.0, 1.0]),
        (["3", "5", "3", "5"], [1.0, 0.0, 1.0, 0.0]),
    ):
        assert majority_vote_reward(prompts=["q"] * 4, completions=completions) == expected
    # 5, 3, 3, 5, 3: no tie, "3" has 3 votes -> 0, 1, 1, 0, 1.
    assert majority_vote_reward(prompts=["q"] * 5, completions=["5", "3", "3", "5", "3"]) == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_majority_vote_reward_normalized_votes_count_together(no_math_verify):
    # "2.0", "2" and "\frac{4}{2}" are one vote "2" (3 votes) against "3" (2 votes): label "2".
    completions = ["3", "3", "2.0", r"\boxed{\frac{4}{2}}", "2"]
    assert majority_vote_reward(prompts=["q"] * 5, completions=completions) == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_majority_vote_reward_groups_by_prompt_not_position(no_math_verify):
    # Prompts interleaved: "a" rows 0, 2, 4 answer 1, 2, 2 -> label 2; "b" rows 1, 3, 5 answer 8, 8, 9 -> label 8.
    prompts = ["a", "b", "a", "b", "a", "b"]
    completions = ["1", "8", "2", "8", "2", "9"]
    assert majority_vote_reward(prompts=prompts, completions=completions) == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_majority_vote_reward_chat_format(no_math_verify):
    # Chat prompts (lists of messages) and chat completions; only assistant contents are read.
    prompt = [{"role": "user", "content": "What is 6 * 7? Put 3 in no box."}]
    other = [{"role": "user", "content": "What is 1 + 1?"}]
    completions = [
        [{"role": "assistant", "content": r"6 * 7 = \boxed{42}"}],
        [{"role": "assistant", "content": "It is 42."}],
        [{"role": "assistant", "content": "It is 41."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "2"}]}],  # content parts
    ]
    rewards = majority_vote_reward(prompts=[prompt, prompt, prompt, other], completions=completions)
    # prompt: 42, 42, 41 -> label 42 -> 1, 1, 0; other: "2" alone -> label "2" -> 1
    assert rewards == [1.0, 1.0, 0.0, 1.0]


def test_majority_vote_reward_positional_groups_without_prompts(no_math_verify):
    # No prompts: consecutive runs of group_size = 2: (1, 1) -> "1"; (2, 3) -> tie, "2" first.
    reward = MajorityVoteReward(group_size=2)
    assert reward(completions=["1", "1", "2", "3"]) == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="prompts"):
        MajorityVoteReward()(completions=["1", "2"])


def test_majority_vote_reward_custom_extractor(no_math_verify):
    # The extractor is pluggable: the text after "ANSWER:" -> "yes", "yes", "no" -> label "yes".
    reward = MajorityVoteReward(extractor=_after_answer_tag)
    completions = ["ANSWER: yes", "ANSWER: yes", "ANSWER: no", "nothing"]
    assert reward(prompts=["q"] * 4, completions=completions) == [1.0, 1.0, 0.0, 0.0]


def _after_answer_tag(text):
    return text.split("ANSWER:", 1)[1].strip() if "ANSWER:" in text else None


def test_majority_vote_reward_pickle_round_trip(no_math_verify):
    completions = ["1", "2", "2", "no", "5"]
    prompts = ["q"] * 5
    for reward in (majority_vote_reward, MajorityVoteReward(extractor=_after_answer_tag, group_size=5)):
        restored = pickle.loads(pickle.dumps(reward))
        assert restored is not reward
        assert restored.__name__ == "majority_vote_reward"
        assert restored(prompts=prompts, completions=completions) == reward(prompts=prompts, completions=completions)
    # "1", "2", "2", None, "5" -> label "2"
    assert pickle.loads(pickle.dumps(majority_vote_reward))(prompts=prompts, completions=completions) == [
        0.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert get_callable_name(majority_vote_reward) == "majority_vote_reward"


# A batch of 3 groups of 4 completions, split between two processes of 6 rows each, so group "B" straddles them.
#   A: 1, 1, 1, 2              -> label 1
#   B: 7, 8 | 9, 8             -> label 8 (2 votes). Process 0 alone would see 7, 8 (tie -> 7);
#                                 process 1 alone would see 9, 8 (tie -> 9).
#   C: 5, 6, 6, None           -> label 6
SPLIT_PROMPTS = ["A"] * 4 + ["B"] * 4 + ["C"] * 4
SPLIT_COMPLETIONS = ["1", "1", "1", "2", "7", "8", "9", "8", "5", "6", "6", "none"]
SPLIT_REWARDS = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]


class _Capture:
    """A gather_fn for one process that only records what it was given (to precompute the other half)."""

    def __call__(self, local):
        self.records = list(local)
        return list(local)


class _FakeGather:
    """Returns the concatenation of both processes' lists in rank order, the other one precomputed."""

    def __init__(self, rank, other):
        self.rank, self.other, self.calls = rank, other, 0

    def __call__(self, local):
        self.calls += 1
        return list(local) + self.other if self.rank == 0 else self.other + list(local)


def _run_split(reward_factory, **columns):
    """Score SPLIT_* as two processes of 6 rows each, with a deterministic fake gather."""
    halves = [slice(0, 6), slice(6, 12)]

    def call(reward, half, **extra):
        sliced = {name: values[half] for name, values in columns.items()}
        return reward(prompts=SPLIT_PROMPTS[half], completions=SPLIT_COMPLETIONS[half], **sliced, **extra)

    captured = []
    for half in halves:
        capture = _Capture()
        call(MajorityVoteReward(gather_fn=capture), half)  # what this process contributes to the gather
        captured.append(capture.records)
    metrics = [[], []]
    rewards, gathers = [], []
    for rank, half in enumerate(halves):
        gather = _FakeGather(rank, captured[1 - rank])
        gathers.append(gather)
        log = metrics[rank]
        rewards.append(call(reward_factory(gather), half, log_metric=lambda n, v, log=log: log.append((n, v))))
    return rewards, metrics, gathers


def test_split_group_matches_unsplit(no_math_verify):
    unsplit = MajorityVoteReward(group_size=4)(prompts=SPLIT_PROMPTS, completions=SPLIT_COMPLETIONS)
    assert unsplit == SPLIT_REWARDS
    rewards, _, gathers = _run_split(lambda gather: MajorityVoteReward(group_size=4, gather_fn=gather))
    assert rewards[0] + rewards[1] == SPLIT_REWARDS
    assert [g.calls for g in gathers] == [1, 1]
    # Without the gather each process votes on its part of B: process 0 -> label 7, process 1 -> label 9.
    local_0 = majority_vote_reward(prompts=SPLIT_PROMPTS[:6], completions=SPLIT_COMPLETIONS[:6])
    local_1 = majority_vote_reward(prompts=SPLIT_PROMPTS[6:], completions=SPLIT_COMPLETIONS[6:])
    assert local_0 + local_1 == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    # With group_size set, the partial group is detected instead of silently voted on.
    with pytest.raises(ValueError, match="gather_fn"):
        MajorityVoteReward(group_size=4)(prompts=SPLIT_PROMPTS[:6], completions=SPLIT_COMPLETIONS[:6])


def test_log_metric_label_accuracy_and_majority_ratio(no_math_verify):
    # Group A: votes 4, 4, 4, 5 -> label 4, majority ratio 3/4; ground truth "4" -> label correct.
    # Group B: votes 1, 2, 2, None -> label 2, majority ratio 2/4; ground truth "1" -> label wrong.
    # label_accuracy = 1/2; majority_ratio = (0.75 + 0.5) / 2 = 0.625; no group's top answers tie.
    prompts = ["A"] * 4 + ["B"] * 4
    completions = ["4", "4", "4", "5", "1", "2", "2", "?"]
    logged = []
    rewards = majority_vote_reward(
        prompts=prompts,
        completions=completions,
        label=["4"] * 4 + ["1"] * 4,
        log_metric=lambda name, value: logged.append((name, value)),
    )
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert dict(logged) == pytest.approx(
        {"ttrl/majority_ratio": 0.625, "ttrl/label_accuracy": 0.5, "ttrl/tied_groups": 0.0}
    )
    assert len(logged) == 3
    # The reward never reads the labels: other (wrong) labels, or none, give the same rewards.
    for columns in ({"label": ["0"] * 8}, {}):
        assert majority_vote_reward(prompts=prompts, completions=completions, **columns) == rewards


def test_log_metric_reads_solution_and_answer_columns(no_math_verify):
    # "solution" holds a full solution: its \boxed{} is the ground truth (4 -> correct, 7 -> wrong vs label 2).
    # "answer" in GSM8K style: the text after "####".
    prompts = ["A"] * 2 + ["B"] * 2
    completions = ["4", "4", "2", "3"]  # labels: A -> 4 (ratio 1), B -> 2 (tie 2-3, first; ratio 1/2)
    for columns, accuracy in (
        ({"solution": [r"so \boxed{4}"] * 2 + [r"\boxed{7}"] * 2}, 0.5),
        ({"answer": ["steps... #### 4"] * 2 + ["#### 2.0"] * 2}, 1.0),
    ):
        logged = {}
        majority_vote_reward(
            prompts=prompts, completions=completions, log_metric=logged.__setitem__, trainer_state=None, **columns
        )
        assert logged == pytest.approx(
            {"ttrl/majority_ratio": 0.75, "ttrl/label_accuracy": accuracy, "ttrl/tied_groups": 0.5}  # B ties
        )
    # Without a ground-truth column only the majority ratio is logged.
    logged = {}
    majority_vote_reward(prompts=prompts, completions=completions, log_metric=logged.__setitem__)
    assert logged == pytest.approx({"ttrl/majority_ratio": 0.75, "ttrl/tied_groups": 0.5})


def test_split_metrics_are_global_on_every_process(no_math_verify):
    # Over the 3 gathered groups of SPLIT_*: majority ratios A 3/4, B 2/4, C 2/4 -> mean 7/12.
    # Ground truth: A "1" (label 1, correct), B "7" (label 8, wrong), C "6" (label 6, correct) -> accuracy 2/3.
    label = ["1"] * 4 + ["7"] * 4 + ["6"] * 4
    _, metrics, _ = _run_split(lambda gather: MajorityVoteReward(gather_fn=gather), label=label)
    for logged in metrics:
        expected = {"ttrl/majority_ratio": 7 / 12, "ttrl/label_accuracy": 2 / 3, "ttrl/tied_groups": 0.0}
        assert dict(logged) == pytest.approx(expected)


def test_majority_vote_reward_invalid_arguments():
    with pytest.raises(ValueError, match="group_size"):
        MajorityVoteReward(group_size=0)
    with pytest.raises(ValueError, match="prompts"):
        majority_vote_reward(prompts=["q"], completions=["1", "2"])
    with pytest.raises(ValueError, match="positions are per-process"):
        MajorityVoteReward(group_size=2, gather_fn=lambda x: x)(completions=["1", "2"])


# ---------------------------------------------------------------------------------------------------------------------
# Equivalent votes, the tie rule and extra votes (TTRL's vote/train split)
# ---------------------------------------------------------------------------------------------------------------------


def test_equivalent_votes_count_together_with_math_verify():
    pytest.importorskip("math_verify")
    # math_verify: "10-3" is the expression 7, so "10-3" and "7" are one class of 2 votes against "3": label "10-3".
    assert majority_vote_reward(prompts=["q"] * 3, completions=["10-3", "7", "3"]) == [1.0, 1.0, 0.0]
    # "1+x" and "x+1" are one class of 2 against "5"; the class is named by its first vote.
    assert majority_vote_reward(prompts=["q"] * 3, completions=[r"\boxed{1+x}", r"\boxed{x+1}", "5"]) == [1, 1, 0]
    votes = vote_groups(["1+x", "x+1", "5"], [0, 0, 0], equivalent=math_equal)
    assert votes[0] == GroupVote("1+x", {"1+x": "1+x", "x+1": "1+x", "5": "5"}, tied=False, majority_ratio=2 / 3)


def test_equivalent_votes_fallback_differs(no_math_verify):
    # The fallback reads the last number of "10-3" (3): votes 3, 7, 3 -> label "3".
    assert majority_vote_reward(prompts=["q"] * 3, completions=["10-3", "7", "3"]) == [1.0, 0.0, 1.0]
    # "1+x", "x+1", "5" are three different strings: a three-way tie, the first ("1+x") wins.
    assert majority_vote_reward(prompts=["q"] * 3, completions=[r"\boxed{1+x}", r"\boxed{x+1}", "5"]) == [1, 0, 0]


def test_ties_none_gives_no_label_and_no_reward(no_math_verify):
    # Group A: 3, 5, 5, 3 -> tie: no label, every reward None.  Group B: 4, 4, 6, None -> label 4.
    # Group C: no answer at all -> no label, no tie: 0.0 as before.
    prompts = ["A"] * 4 + ["B"] * 4 + ["C"] * 2
    completions = ["3", "5", "5", "3", "4", "4", "6", "?", "?", "?"]
    logged = {}
    reward = MajorityVoteReward(ties="none")
    rewards = reward(prompts=prompts, completions=completions, log_metric=logged.__setitem__, label=["3"] * 10)
    assert rewards == [None] * 4 + [1.0, 1.0, 0.0, 0.0] + [0.0, 0.0]
    # majority ratios: A 2/4, B 2/4, C 0/2 -> 1/3; tied groups: A -> 1/3; label accuracy vs "3": A has no label
    # (wrong), B's 4 is wrong, C has none -> 0.
    assert logged == pytest.approx({"ttrl/majority_ratio": 1 / 3, "ttrl/tied_groups": 1 / 3, "ttrl/label_accuracy": 0})
    # The default rule gives A's label to its first answer, 3.
    assert MajorityVoteReward()(prompts=prompts, completions=completions)[:4] == [1.0, 0.0, 0.0, 1.0]
    assert majority_vote_labels(["3", "5", "5", "3"], [0] * 4, ties="none") == [None] * 4
    with pytest.raises(ValueError, match="`ties` is 'random'; valid: 'first', 'none'"):
        MajorityVoteReward(ties="random")


def test_extra_votes_decide_the_label_but_get_no_reward(no_math_verify):
    # Trained: 1, 2 (a tie alone: "1" first).  Extra votes of row 0: 2, 2; of row 1: 3.
    # All five votes: 1, 2, 2, 2, 3 -> label 2 (3 of 5): rewards of the trained rows 0, 1.
    logged = {}
    rewards = majority_vote_reward(
        prompts=["q", "q"], completions=["1", "2"], ttrl_votes=[["2", "2"], ["3"]], log_metric=logged.__setitem__
    )
    assert rewards == [0.0, 1.0]
    assert logged == pytest.approx({"ttrl/majority_ratio": 3 / 5, "ttrl/tied_groups": 0.0})
    assert majority_vote_reward(prompts=["q", "q"], completions=["1", "2"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="1 rows of ttrl_votes for 2 completions"):
        majority_vote_reward(prompts=["q", "q"], completions=["1", "2"], ttrl_votes=[["2"]])


def test_extra_votes_are_gathered_across_processes(no_math_verify):
    # Group B straddles the processes (SPLIT_*: 7, 8 | 9, 8 -> label 8). Extra votes for B's rows on process 1 only:
    # 9, 9, 9 -> votes 7, 8, 9, 8, 9, 9, 9 -> label 9, which process 0 must see too.
    extra = [[]] * 6 + [["9", "9"], ["9"]] + [[]] * 4
    rewards, _, _ = _run_split(lambda gather: MajorityVoteReward(gather_fn=gather), ttrl_votes=extra)
    assert rewards[0] + rewards[1] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
