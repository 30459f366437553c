"""PPO-ptx (`trl_plus.trainer.ptx`) on 2 processes against 1; `tests/test_rlhf.py` launches it and compares runs.

    python check_ptx.py MODEL_DIR OUT_DIR                                        # 1 process
    torchrun --standalone --nproc_per_node 2 check_ptx.py MODEL_DIR OUT_DIR      # 2 processes, gloo on CPU

PPO with the LoRA critic on the fixed batch of `fixed_batch.py`, plus `ptx_coef=0.5` on 48 texts, 6 texts per
micro-batch over all processes (`ptx_batch_size` = 6 / world size), for 2 optimizer steps of `trainer.train()`.
Records the texts each process's stream handed out, in order, the running reward moments (`normalize_reward`) and
every trainable parameter after training.

Writes OUT_DIR/rank{R}.json (the texts) and OUT_DIR/rank{R}.pt (the parameters).
"""

import sys
from pathlib import Path

import fixed_batch

PTX_TEXTS = [f"text {i} " + "ab" * (i % 4) for i in range(48)]
GLOBAL_PTX_BATCH = 6


def main(model_dir: str, out_dir: str) -> int:
    from datasets import Dataset
    from peft import LoraConfig

    from trl_plus.trainer.ppo import PPOConfig, PPOTrainer

    out_dir = Path(out_dir)
    rank, world_size, samples = fixed_batch.start(model_dir)
    args = PPOConfig(
        **fixed_batch.config_settings(out_dir, world_size),
        num_generations=1,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        ptx_coef=0.5,
        ptx_batch_size=GLOBAL_PTX_BATCH // world_size,
        normalize_reward=True,
    )
    trainer = PPOTrainer(
        model_dir,
        args=args,
        **fixed_batch.fixed_data(samples),
        peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        ptx_dataset=Dataset.from_dict({"text": PTX_TEXTS}),
    )
    seen = []
    next_texts = trainer._ptx.next_texts

    def recording_next_texts():
        texts = next_texts()
        seen.append(texts)
        return texts

    trainer._ptx.next_texts = recording_next_texts
    trainer.train()
    tensors = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    summary = {
        "rank": rank,
        "world_size": world_size,
        "texts": seen,
        "ptx_loss": [entry["ptx/loss"] for entry in trainer.state.log_history if "ptx/loss" in entry],
        "reward_moments": trainer._score_normalizer.state_dict(),
        "checks": {},
    }
    return fixed_batch.finish(out_dir, rank, summary, tensors)


if __name__ == "__main__":
    fixed_batch.exit_process(main(sys.argv[1], sys.argv[2]))
