"""GRESO selective rollout (arXiv 2506.02177) and generation accounting: the pure rule, its state, and the trainer."""

import itertools

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_config
from trl_plus import DAPOConfig, GRPOConfig, GRPOTrainer, PPOConfig, ReMaxConfig, ReMaxTrainer
from trl_plus.rewards.majority_vote import prompt_key
from trl_plus.sampling import Sampler, SelectiveRollout, adapted_exploration, keep_probability
from trl_plus.sampling.selective import SIGNAL, SOLVED, UNSOLVED
from trl_plus.trainer.checkpoints import MissingCheckpointFileError
from trl_plus.trainer.grpo import GENERATION_COUNTS_FILE, SURPLUS_BUFFER_FILE

GROUP_SIZE = 4


# ---------------------------------------------------------------------- the pure rule
def test_keep_probability_golden_values():
    # keep = max(p^z, 0.01) (GRESO Algorithm 1; the 0.01 floor is the authors' code)
    assert keep_probability(0, 0.5) == 1.0  # no zero-variance streak: always generated
    assert keep_probability(1, 0.5) == 0.5
    assert keep_probability(3, 0.5) == 0.125  # 0.5^3
    assert keep_probability(2, 0.3) == pytest.approx(0.09)  # 0.3^2
    assert keep_probability(7, 0.5) == 0.01  # 0.5^7 = 0.0078 < floor 0.01
    assert keep_probability(1, 0.05) == 0.05


def test_keep_probability_is_bounded_and_monotone():
    explorations = [0.05, 0.2, 0.5, 0.8, 0.95]
    for exploration in explorations:
        values = [keep_probability(streak, exploration) for streak in range(30)]
        assert all(0.01 <= value <= 1.0 for value in values)
        assert all(later <= earlier for earlier, later in itertools.pairwise(values))  # longer streak: kept less
    for streak in range(1, 30):
        values = [keep_probability(streak, exploration) for exploration in explorations]
        assert all(later >= earlier for earlier, later in itertools.pairwise(values))  # more exploration: kept more


def test_adapted_exploration_steps_toward_the_target_within_bounds():
    assert adapted_exploration(0.5, 0.30, 0.25) == pytest.approx(0.49)  # too many zero-variance groups: skip more
    assert adapted_exploration(0.5, 0.25, 0.25) == pytest.approx(0.49)  # at the target: also down (authors' >=)
    assert adapted_exploration(0.5, 0.10, 0.25) == pytest.approx(0.51)  # too few: skip less
    assert adapted_exploration(0.05, 1.0, 0.25) == 0.05  # lower bound
    assert adapted_exploration(0.95, 0.0, 0.25) == 0.95  # upper bound


def test_record_counts_streaks_of_one_kind_and_classifies_by_the_reward_range():
    rollout = SelectiveRollout(target_zero_variance=0.25, exploration=0.5)
    # The first round is all 0: range [0, 0], middle 0, and 0 > 0 is false, so it is unsolved.
    assert rollout.record(["a"], torch.zeros(1, GROUP_SIZE)) == [UNSOLVED]
    rewards = torch.tensor([[1.0, 1, 1, 1], [0.0, 0, 0, 0], [0.0, 1, 0, 0]])
    # range [0, 1], middle 0.5: all-1 solved, all-0 unsolved, mixed has a signal
    assert rollout.record(["a", "b", "c"], rewards) == [SOLVED, UNSOLVED, SIGNAL]
    assert rollout.history == {"a": [SOLVED, 1], "b": [UNSOLVED, 1], "c": [SIGNAL, 0]}  # a: kind changed, streak 1
    rollout.record(["a", "b", "c"], torch.tensor([[1.0, 1, 1, 1], [1.0, 0, 0, 0], [0.0, 0, 0, 0]]))
    assert rollout.history == {"a": [SOLVED, 2], "b": [SIGNAL, 0], "c": [UNSOLVED, 1]}
    assert rollout.keep_probability("a") == 0.25  # 0.5^2
    assert rollout.keep_probability("b") == 1.0
    assert rollout.keep_probability("never seen") == 1.0
    # NaN is unscored: one scored reward is no signal; a fully unscored group is unsolved
    nan = float("nan")
    outcomes = rollout.record(["d", "e"], torch.tensor([[1.0, nan, nan, nan], [nan, nan, nan, nan]]))
    assert outcomes == [SOLVED, UNSOLVED]


def test_choose_skipped_draws_with_the_keep_probability_and_is_reproducible():
    rollout = SelectiveRollout(exploration=0.5, seed=3)
    rollout.history = {"easy": [SOLVED, 2], "fresh": [SIGNAL, 0]}
    keys = ["easy", "fresh"] * 20000
    skips = rollout.choose_skipped(keys)
    easy_skips = skips[0::2]
    assert sum(easy_skips) / len(easy_skips) == pytest.approx(0.75, abs=0.01)  # 1 - 0.5^2
    assert not any(skips[1::2])  # a prompt with a signal is never skipped
    twin = SelectiveRollout(exploration=0.5, seed=3)  # another process: same seed, same keys -> same decisions
    twin.history = dict(rollout.history)
    assert twin.choose_skipped(keys) == skips


def test_adapt_moves_each_kind_to_its_share_of_the_target():
    rollout = SelectiveRollout(target_zero_variance=0.25, exploration=0.5)
    # targets: solved 0.25/3 = 0.083, unsolved 0.25*2/3 = 0.167; 12 groups: 3 solved (0.25), 1 unsolved (0.083)
    rollout.adapt([SOLVED] * 3 + [UNSOLVED] + [SIGNAL] * 8)
    assert rollout.exploration == {SOLVED: pytest.approx(0.49), UNSOLVED: pytest.approx(0.51)}


def test_state_dict_round_trip_continues_the_same_decisions(tmp_path):
    rollout = SelectiveRollout(exploration=0.4, seed=1)
    rollout.record(["a", "b"], torch.tensor([[1.0, 1, 1, 1], [0.0, 1, 0, 1]]))
    rollout.choose_skipped(["a"] * 5)  # move the generator
    path = tmp_path / "state.pt"
    torch.save(rollout.state_dict(), path)
    restored = SelectiveRollout(exploration=0.9, seed=99)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.history == rollout.history and restored.exploration == rollout.exploration
    assert restored.choose_skipped(["a"] * 50) == rollout.choose_skipped(["a"] * 50)
    with pytest.raises(ValueError, match=r"keys \['exploration', 'generator', 'history', 'reward_range'\]"):
        restored.load_state_dict({"history": {}})


def _rows(*prompts: str, group_size: int = 2) -> list[dict]:
    return [{"prompt": prompt} for prompt in prompts for _ in range(group_size)]


def test_sampler_adapts_only_at_steps_whose_prompts_all_came_back():
    # GRESO adapts p from the second epoch on (`epoch > 0` in the authors' ray_trainer.py): a step that generates a
    # new prompt, which no history could have skipped, leaves both exploration probabilities as they are.
    metrics = []
    sampler = Sampler(
        group_size=2,
        num_processes=1,
        process_index=0,
        prompt_batches=lambda epoch: [_rows("p0", "p1")] * 20,  # replacements: prompts with a history by then
        gather_object=lambda local: local,  # one process
        to_training_batch=lambda batch: batch,
        old_log_probs=None,
        log_metric=lambda name, value: metrics.append((name, value)),
        pad_values={},
        selective_rollout=SelectiveRollout(target_zero_variance=0.25, exploration=0.5, seed=0),
    )

    def all_zero(inputs):  # every group zero-variance at reward 0: unsolved (no higher reward seen)
        return {}, torch.zeros(len(inputs))

    def exploration():
        return dict(sampler.selective_rollout.exploration)

    sampler.sample(_rows("p0", "p1"), all_zero)  # both prompts new
    assert exploration() == {SOLVED: 0.5, UNSOLVED: 0.5}
    sampler.sample(_rows("p0", "p2"), all_zero)  # p0 comes back, p2 is new (p0 may be replaced by p0 or p1)
    assert exploration() == {SOLVED: 0.5, UNSOLVED: 0.5}  # before: 0.51 / 0.49, adapted on p2's group
    sampler.sample(_rows("p0", "p1"), all_zero)  # all returning (so are their replacements)
    # unsolved share 2/2 = 1 >= 2/3 * 0.25: down 0.01; solved share 0 < 1/3 * 0.25: up 0.01
    assert exploration() == {SOLVED: pytest.approx(0.51), UNSOLVED: pytest.approx(0.49)}
    logged_unsolved = [value for name, value in metrics if name == "selective_rollout/exploration_unsolved"]
    assert logged_unsolved == [0.5, 0.5, pytest.approx(0.49)]


def test_sampler_short_of_kept_prompts_generates_the_skipped_ones_likeliest_to_teach():
    # Every candidate skipped (the draw forced to "skip"): the sampler still generates its one group, from the skipped
    # prompt with the highest keep probability p^z (p = 0.5): short 0.5 (z=1) over mid 0.25 (z=2) over long 0.03
    # (z=5), whatever order the stream gave them in.
    rollout = SelectiveRollout(exploration=0.5, seed=0)
    streaks = {"long": 5, "mid": 2, "short": 1}
    rollout.history = {prompt_key(prompt): [UNSOLVED, streak] for prompt, streak in streaks.items()}
    rollout.choose_skipped = lambda keys: [True] * len(keys)
    metrics = {}
    sampler = Sampler(
        group_size=2,
        num_processes=1,
        process_index=0,
        prompt_batches=lambda epoch: [_rows("long"), _rows("mid"), _rows("short")] * 3,
        gather_object=lambda local: local,
        to_training_batch=lambda batch: batch,
        old_log_probs=None,
        log_metric=metrics.__setitem__,
        pad_values={},
        selective_rollout=rollout,
    )
    generated = []

    def record_prompts(inputs):
        generated.extend(row["prompt"] for row in inputs)
        return {}, torch.zeros(len(inputs))

    sampler.sample(_rows("long"), record_prompts)
    assert generated == ["short", "short"]
    assert metrics["selective_rollout/prompts_skipped"] == 8  # 9 candidates (the batch and 8 draws), 1 generated
    assert metrics["selective_rollout/prompts_forced"] == 1  # the one generated had been skipped


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(selective_rollout_target=1.0), "`selective_rollout_target` is 1.0; valid: 0 < x < 1."),
        (dict(selective_rollout_exploration=0.0), "`selective_rollout_exploration` is 0.0; valid: 0 < p < 1."),
    ],
)
def test_config_refuses_bad_selective_rollout_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(GRPOConfig, tmp_path, selective_rollout=True, **overrides)


def test_ppo_with_groups_of_one_refuses_selective_rollout(tmp_path):
    with pytest.raises(ValueError, match="`selective_rollout` is True with `num_generations` 1; valid: num_gen"):
        make_config(PPOConfig, tmp_path, selective_rollout=True, num_generations=1, per_device_train_batch_size=4)


# ---------------------------------------------------------------------- the trainer
PROMPTS_A = [f"a{index}=" for index in range(4)]  # always rewarded 0: every group zero-variance (unsolved)
PROMPTS_B = [f"b{index}=" for index in range(4)]  # rewarded by position in the group: always a signal


def position_reward(prompts, completions, **kwargs):
    return [0.0 if prompt.startswith("a") else float(index % GROUP_SIZE) for index, prompt in enumerate(prompts)]


class RoundRecorder(GRPOTrainer):
    """Records the prompts of every generated round and the size of each training batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds, self.batch_sizes = [], []

    def _generate_and_score_round(self, inputs):
        output = super()._generate_and_score_round(inputs)
        if self.model.training:
            self.rounds.append([row["prompt"] for row in inputs[::GROUP_SIZE]])
        return output

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.batch_sizes.append(output["completion_ids"].size(0))
        return output


def run(model_path, output_dir, config_class=GRPOConfig, trainer_class=RoundRecorder, max_steps=12, **overrides):
    args = make_config(config_class, output_dir, max_steps=max_steps, **overrides)
    trainer = trainer_class(
        model=model_path,
        reward_funcs=position_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS_A + PROMPTS_B}),
    )
    trainer.train()
    return trainer


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


STEPS = 24  # 4 steps an epoch: each prompt comes back 6 times


@pytest.fixture(scope="module")
def plain_and_selective(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("selective")
    plain = run(tiny_model_path, root / "plain", max_steps=STEPS)
    settings = dict(selective_rollout=True, selective_rollout_exploration=0.2, save_strategy="steps", save_steps=10)
    selective = run(tiny_model_path, root / "selective", max_steps=STEPS, **settings)
    return plain, selective


def test_selective_rollout_skips_only_zero_variance_prompts_and_keeps_the_batch_full(plain_and_selective):
    plain, selective = plain_and_selective
    assert selective.batch_sizes == plain.batch_sizes == [8] * STEPS  # 2 groups of 4 per step, every step
    generated = [prompt for prompts in selective.rounds for prompt in prompts]
    plain_generated = [prompt for prompts in plain.rounds for prompt in prompts]
    a_share = sum(prompt.startswith("a") for prompt in generated) / len(generated)
    plain_a_share = sum(prompt.startswith("a") for prompt in plain_generated) / len(plain_generated)
    assert plain_a_share == pytest.approx(0.5, abs=0.15)  # half the pool, drawn uniformly
    assert a_share < plain_a_share - 0.15  # the always zero-variance prompts are skipped once they come back
    skipped = logged(selective, "selective_rollout/prompts_skipped")
    assert skipped[0] == 0 and sum(skipped) > 0  # nothing has a history at the first step
    # the metric is the share of zero-variance (here: "a") groups among each step's generated groups
    zero_variance = logged(selective, "sampling/zero_variance_fraction")
    expected = [sum(prompt.startswith("a") for prompt in prompts) / len(prompts) for prompts in selective.rounds]
    assert zero_variance == pytest.approx(expected)
    per_trained = logged(selective, "sampling/completions_per_trained_group")
    expected = [
        GROUP_SIZE * len(prompts) / max(sum(p.startswith("b") for p in prompts), 1) for prompts in selective.rounds
    ]
    assert per_trained == pytest.approx(expected)
    # the "a" groups are unsolved: after each step whose unsolved share reached its target 2/3 * 0.25, the
    # exploration probability went down 0.01 (more skipping), otherwise up 0.01
    exploration = [0.2] + logged(selective, "selective_rollout/exploration_unsolved")
    changes = [later - earlier for earlier, later in itertools.pairwise(exploration)]
    adapted = [(change, share) for change, share in zip(changes, zero_variance, strict=True) if change]
    assert len(adapted) >= STEPS - 4  # every step from the first that saw a prompt again
    assert all(change == pytest.approx(-0.01 if share >= 0.25 * 2 / 3 else 0.01) for change, share in adapted)
    assert {change < 0 for change, _ in adapted} == {True, False}  # both directions: it holds the target


def test_selective_rollout_resumed_in_its_third_epoch_continues_exactly(
    plain_and_selective, tiny_model_path, tmp_path
):
    # checkpoint-10: epoch 2 of 4 steps, prompts skipped since epoch 1. The resumed run draws the same skips (the
    # history, exploration probabilities and generator restored), the same replacements (the extra-prompt stream's
    # position) and the same epoch order (EpochOrder), so it generates and trains exactly as the uninterrupted run.
    _, selective = plain_and_selective
    checkpoint = f"{selective.args.output_dir}/checkpoint-10"
    saved = torch.load(f"{checkpoint}/{SURPLUS_BUFFER_FILE}", weights_only=True)
    assert set(saved) == {"surplus_buffer", "prompt_stream", "selective_rollout"}
    assert set(saved["selective_rollout"]["history"]) == {prompt_key(prompt) for prompt in PROMPTS_A + PROMPTS_B}
    assert sum(logged(selective, "selective_rollout/prompts_skipped")[10:]) > 0  # skipping after the resume point
    args = make_config(
        GRPOConfig, tmp_path, max_steps=STEPS, selective_rollout=True, selective_rollout_exploration=0.2
    )
    resumed = RoundRecorder(
        model=tiny_model_path,
        reward_funcs=position_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS_A + PROMPTS_B}),
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.rounds == selective.rounds[10:]
    for key in ("grad_norm", "selective_rollout/exploration_unsolved", "selective_rollout/prompts_skipped"):
        assert logged(resumed, key)[10:] == pytest.approx(logged(selective, key)[10:], abs=1e-6), key
    assert logged(resumed, "generation/completions")[10:] == logged(selective, "generation/completions")[10:]
    final = resumed._sampler.state_dict()["selective_rollout"]
    expected = selective._sampler.state_dict()["selective_rollout"]
    assert final["history"] == expected["history"] and final["exploration"] == expected["exploration"]
    assert torch.equal(final["generator"], expected["generator"])
    expected_params = dict(selective.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert (param - expected_params[name]).abs().max().item() <= 1e-6, name


def test_selective_rollout_with_dynamic_sampling_fills_the_batch_with_signal(tiny_model_path, tmp_path):
    trainer = run(tiny_model_path, tmp_path, config_class=DAPOConfig, selective_rollout=True, max_steps=8)
    assert trainer.batch_sizes == [8] * 8
    assert logged(trainer, "dynamic_sampling/groups_masked") == [0] * 8
    assert sum(logged(trainer, "selective_rollout/prompts_skipped")) > 0
    completions = logged(trainer, "generation/completions")
    generated_groups = logged(trainer, "dynamic_sampling/groups_generated")
    assert completions == list(itertools.accumulate(groups * GROUP_SIZE for groups in generated_groups))


# ---------------------------------------------------------------------- generation accounting
def test_generation_counts_match_trl_lengths(tiny_model_path, tmp_path):
    trainer = run(tiny_model_path, tmp_path, trainer_class=GRPOTrainer, max_steps=3)
    assert logged(trainer, "generation/completions") == [8, 16, 24]
    per_step = [round(length * 8) for length in logged(trainer, "completions/mean_length")]  # TRL's own metric
    assert logged(trainer, "generation/tokens") == list(itertools.accumulate(per_step))


def test_remax_counts_its_greedy_rows(tiny_model_path, tmp_path):
    trainer = run(tiny_model_path, tmp_path, config_class=ReMaxConfig, trainer_class=ReMaxTrainer, max_steps=2)
    assert logged(trainer, "generation/completions") == [8, 16]  # 2 greedy rows per step, not trained, counted


def test_resume_refuses_a_checkpoint_without_generation_counts(tiny_model_path, tmp_path):
    trainer = run(
        tiny_model_path, tmp_path / "run", trainer_class=GRPOTrainer, max_steps=2, save_strategy="steps", save_steps=1
    )
    checkpoint = f"{trainer.args.output_dir}/checkpoint-1"
    (tmp_path / "run" / "checkpoint-1" / GENERATION_COUNTS_FILE).unlink()
    args = make_config(GRPOConfig, tmp_path / "resumed", max_steps=2)
    resumed = GRPOTrainer(
        model=tiny_model_path, reward_funcs=position_reward, args=args, train_dataset=trainer.train_dataset
    )
    with pytest.raises(MissingCheckpointFileError, match=f"`{GENERATION_COUNTS_FILE}` .* is missing"):
        resumed.train(resume_from_checkpoint=checkpoint)
