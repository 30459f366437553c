"""Sampling-side benchmark: DAPO dynamic sampling and the ReMax greedy baseline, measured side by side in one run.

    python benchmarks/sampling.py            # about 1 minute on 2 CPU cores

(a) Dynamic sampling on a toy task where most groups are all-correct or all-wrong: a quarter of the prompts are
"easy" (every completion scores 1), half are "hard" (every completion scores 0), and a quarter are "open" (a
completion scores 1 when its first character is a digit). It reports the fraction of trained groups whose rewards
are all equal (target 0) and the fraction of generated groups with a reward signal that end up trained on, with the
surplus buffer (target >= 95%) and with the surplus discarded (buffer capacity 0).
(b) ReMax vs GRPO median step time at G = 8 on the same tiny model and prompts (target <= 1.15x).
"""

import argparse
import statistics
import tempfile

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

import trl_plus
from trl_plus.tiny import save_tiny_model

NUM_PROMPTS = 64


def toy_reward(prompts, completions, **kwargs):
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        kind = int(prompt.split("+")[0]) % 4
        if kind == 0:
            rewards.append(1.0)  # easy: always right
        elif kind in (1, 2):
            rewards.append(0.0)  # hard: always wrong
        else:
            rewards.append(float(completion[:1].isdigit()))  # open: depends on the completion
    return rewards


class BatchRecorder(trl_plus.DAPOTrainer):
    """Records, for every trained batch, the rewards of each group whose completions are in the loss."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        group_size = self.num_generations
        in_loss = output["completion_mask"].sum(dim=1) > 0
        completions = self.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
        prompts = self.processing_class.batch_decode(output["prompt_ids"], skip_special_tokens=True)
        rewards = torch.tensor(toy_reward(prompts, completions))
        for start in range(0, len(rewards), group_size):
            if in_loss[start : start + group_size].all():
                self.trained_groups.append(rewards[start : start + group_size])
        return output


def config(config_class, output_dir, **overrides):
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        mask_truncated_completions=False,
    )
    settings.update(overrides)
    return config_class(**settings)


def dynamic_sampling_run(model_path, dataset, workdir, steps, keep_surplus):
    args = config(trl_plus.DAPOConfig, f"{workdir}/ds", dynamic_sampling=True, max_num_gen_batches=8, max_steps=steps)
    trainer = BatchRecorder(model=model_path, reward_funcs=toy_reward, args=args, train_dataset=dataset)
    trainer.remove_callback(PrinterCallback)
    trainer.trained_groups = []
    if not keep_surplus:
        trainer._sampler.surplus.capacity_groups = 0  # the counterfactual: surplus groups are thrown away
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "dynamic_sampling/groups_generated" in entry]
    generated = sum(entry["dynamic_sampling/groups_generated"] for entry in logs)
    with_signal = sum(
        entry["dynamic_sampling/groups_generated"] * (1 - entry["dynamic_sampling/zero_std_fraction"])
        for entry in logs
    )
    zero_variance = sum(bool((group == group[0]).all()) for group in trainer.trained_groups)
    return {
        "generated": generated,
        "with_signal": with_signal,
        "trained": len(trainer.trained_groups),
        "zero_variance_trained": zero_variance,
        "left_in_buffer": trainer._sampler.surplus.num_groups,
        "rounds": statistics.mean(entry["dynamic_sampling/rounds"] for entry in logs),
    }


def median_step_time(config_class, trainer_class, model_path, dataset, workdir, steps):
    args = config(config_class, f"{workdir}/{config_class.__name__}", num_generations=8, max_steps=steps)
    trainer = trainer_class(model=model_path, reward_funcs=toy_reward, args=args, train_dataset=dataset)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    return statistics.median(times[2:])  # the first steps warm up


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per dynamic-sampling run")
    parser.add_argument("--timing-steps", type=int, default=30, help="steps per ReMax / GRPO timing run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating ReMax / GRPO timing runs each")
    cli = parser.parse_args()
    torch.set_num_threads(1)

    workdir = tempfile.mkdtemp(prefix="trl-plus-sampling-")
    model_path = save_tiny_model(f"{workdir}/model")
    dataset = Dataset.from_dict({"prompt": [f"{index}+1=" for index in range(NUM_PROMPTS)]})

    print("## (a) DAPO dynamic sampling (1/4 easy, 1/2 hard, 1/4 open prompts; 4 groups per step)\n")
    print("| surplus | groups generated | with signal | trained | trained / with signal | zero-variance trained |")
    print("| --- | --- | --- | --- | --- | --- |")
    for keep_surplus in (True, False):
        result = dynamic_sampling_run(model_path, dataset, workdir, cli.steps, keep_surplus)
        share = result["trained"] / result["with_signal"]
        print(
            f"| {'kept in buffer' if keep_surplus else 'discarded'} | {result['generated']:.0f} | "
            f"{result['with_signal']:.0f} | {result['trained']} | {share:.1%} | "
            f"{result['zero_variance_trained'] / result['trained']:.1%} |"
        )
        if keep_surplus:
            print(
                f"<!-- {result['left_in_buffer']} groups left in the buffer at the end, {result['rounds']:.2f} "
                "rounds per step on average -->"
            )

    print("\n## (b) ReMax vs GRPO step time, G = 8\n")
    remax_times, grpo_times = [], []
    for _ in range(cli.repeats):
        grpo_times.append(
            median_step_time(trl_plus.GRPOConfig, trl_plus.GRPOTrainer, model_path, dataset, workdir, cli.timing_steps)
        )
        remax_times.append(
            median_step_time(
                trl_plus.ReMaxConfig, trl_plus.ReMaxTrainer, model_path, dataset, workdir, cli.timing_steps
            )
        )
    remax, grpo = statistics.median(remax_times), statistics.median(grpo_times)
    print("| trainer | median step time (ms) |\n| --- | --- |")
    print(f"| GRPO | {grpo * 1000:.1f} |\n| ReMax | {remax * 1000:.1f} |")
    print(f"\nReMax / GRPO step time: {remax / grpo:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
