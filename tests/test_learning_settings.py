"""`benchmarks/learning.py`'s multi-epoch setting: the issue's conditions on its prompt pool hold."""

import pytest
from conftest import load_benchmark

from trl_plus.demo import ANSWER_LENGTH, exact_match_reward, reverse_task


@pytest.fixture(scope="module")
def learning():
    return load_benchmark("learning")


def test_every_prompt_of_the_pool_is_visited_at_least_4_times(learning):
    preset = learning.MULTI_EPOCH
    visits = preset["budget"] / learning.NUM_GENERATIONS / preset["pool"]  # 20,480 / 8 / 512 = 5
    assert visits == 5


def test_a_quarter_of_the_pool_can_never_be_solved(learning):
    train, _ = reverse_task()
    pool = learning.unanswerable_pool(train[: learning.MULTI_EPOCH["pool"]], learning.MULTI_EPOCH["unanswerable"])
    changed = [index for index, (kept, original) in enumerate(zip(pool, train, strict=False)) if kept != original]
    assert changed == list(range(0, 512, 4))  # 128 prompts, every 4th
    longest = ANSWER_LENGTH + 3  # run_one's max_completion_length, in characters (one token each)
    for index in changed:
        prompt, answer = pool[index]
        assert prompt == train[index][0] and answer == train[index][1] * 3 and len(answer) > longest
        # no completion within the limit matches: the longest prefix of the answer itself scores 0
        assert exact_match_reward([answer[:longest]], [answer]) == [0.0]
    assert learning.unanswerable_pool(train[:8], 0.0) == train[:8]


def test_group_outcomes_split_zero_variance_groups_by_the_previous_visit(learning):
    outcomes = learning.GroupOutcomes(exact_match_reward, group_size=2)
    assert outcomes.__name__ == "exact_match_reward"  # TRL names the reward metrics after it

    def visit(*groups):  # (prompt, the two completions) per group; the answer is "x", so "x" scores 1
        prompts = [prompt for prompt, _ in groups for _ in range(2)]
        completions = [completion for _, pair in groups for completion in pair]
        return outcomes(prompts=prompts, completions=completions, answer=["x"] * len(prompts))

    assert visit(("a", ("y", "y")), ("b", ("x", "y"))) == [0.0, 0.0, 1.0, 0.0]
    visit(("a", ("x", "x")), ("b", ("y", "x")))  # a: zero-variance again (all solved), b: signal again
    visit(("a", ("x", "y")))  # a: signal after zero-variance
    visit(("a", ("y", "y")))  # a: zero-variance after signal
    # a: zv, zv, signal, zv; b: signal, signal. Zero-variance groups: 1 first visit (a's), 1 after a zero-variance
    # group (a's 2nd), 1 after a signal (a's 4th); visits that followed a zero-variance group: a's 2nd and 3rd.
    assert outcomes.summary() == {
        "groups": 6,
        "first_visit": 1,
        "after_signal": 1,
        "after_zero_variance": 1,
        "repeats": 2,
        "prompts": 2,
    }
