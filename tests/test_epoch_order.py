"""A run resumed past its first epoch trains on the prompts, in the order, of the uninterrupted run (`EpochOrder`)."""

import pytest
import trl
from conftest import make_config
from datasets import Dataset
from trl.trainer.utils import RepeatSampler

from trl_plus import GRPOConfig, GRPOTrainer
from trl_plus.trainer.epoch_order import EpochOrder

PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(2)]  # 8 prompts, 2 per step: 4 steps an epoch
STEPS = 10  # epochs 0 and 1, half of epoch 2


def index_reward(prompts, completions, **kwargs):
    """Differs inside every group (the position in the group) and between prompts (their first digit)."""
    return [float(index % 4) + int(prompt[0]) for index, prompt in enumerate(prompts)]


def test_set_epoch_replays_the_permutations_of_an_uninterrupted_sampler():
    plain = RepeatSampler(range(10), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=7)
    passes = [list(plain) for _ in range(4)]  # TRL: one generator, one permutation drawn per pass
    assert len({tuple(order) for order in passes}) == 4
    order = EpochOrder(RepeatSampler(range(10), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=7))
    for epoch in (0, 1, 2, 3, 1, 3):  # in order (an uninterrupted run), then as resumed runs would start
        order.set_epoch(epoch)
        assert list(order) == passes[epoch]
    assert len(order) == len(plain) == 3 * 3 * 2 * 2  # 3 whole batches of 3, each repeated 2 x 2 times
    unshuffled = EpochOrder(RepeatSampler(range(4), mini_repeat_count=1, batch_size=2, shuffle=False))
    unshuffled.set_epoch(5)
    assert list(unshuffled) == [0, 1, 2, 3]


class PromptRecorder(GRPOTrainer):
    """Records the prompts of each training step's generation batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated = []

    def _generate_and_score_completions(self, inputs):
        if self.model.training:
            self.generated.append([row["prompt"] for row in inputs[::4]])
        return super()._generate_and_score_completions(inputs)


def train(model_path, output_dir, resume_from=None, trainer_class=PromptRecorder, config_class=GRPOConfig, **extra):
    settings = {"max_steps": STEPS, "save_strategy": "steps", "save_steps": 2, **extra}
    args = make_config(config_class, output_dir, **settings)
    trainer = trainer_class(
        model=model_path, reward_funcs=index_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, tmp_path_factory):
    return train(tiny_model_path, tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("checkpoint_step", [6, 8])  # inside epoch 1; at the end of epoch 1
def test_grpo_resumed_past_the_first_epoch_is_exact(uninterrupted, tiny_model_path, tmp_path, checkpoint_step):
    checkpoint = f"{uninterrupted.args.output_dir}/checkpoint-{checkpoint_step}"
    resumed = train(tiny_model_path, tmp_path, resume_from=checkpoint)
    # epoch 0's order again would be TRL's behaviour: other prompts in epochs 1 and 2
    assert resumed.generated == uninterrupted.generated[checkpoint_step:]
    after = slice(checkpoint_step, None)
    assert logged(resumed, "grad_norm")[after] == pytest.approx(logged(uninterrupted, "grad_norm")[after], abs=1e-6)
    expected = dict(uninterrupted.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert (param - expected[name]).abs().max().item() <= 1e-6, name


def test_uninterrupted_order_is_trls(uninterrupted, tiny_model_path, tmp_path):
    # Drop-in: the same prompts in the same order as TRL's own trainer over three epochs.
    class TrlRecorder(trl.GRPOTrainer):
        generated = []

        def _generate_and_score_completions(self, inputs):
            if self.model.training:
                self.generated.append([row["prompt"] for row in inputs[::4]])
            return super()._generate_and_score_completions(inputs)

    trl_run = train(tiny_model_path, tmp_path, trainer_class=TrlRecorder, config_class=trl.GRPOConfig)
    assert trl_run.generated == uninterrupted.generated
    assert len({tuple(prompts) for prompts in uninterrupted.generated[:4]}) == 4  # each epoch: 4 distinct steps
    assert sorted(sum(uninterrupted.generated[4:8], [])) == sorted(PROMPTS)
    assert uninterrupted.generated[4:8] != uninterrupted.generated[:4]  # epoch 1 is reshuffled
