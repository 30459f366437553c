"""VAPO (arXiv 2504.05118): PPO with value pretraining, decoupled and length-adaptive GAE, a positive-example LM loss,
Clip-Higher and token-level loss, for verifiable rewards (math, code).

`VAPOConfig` holds the paper's values: lambda_critic = 1.0, lambda_policy = 1 - 1/(0.05 * length), 50
value-pretraining steps (the policy frozen, the critic fit to Monte-Carlo returns; they count in `max_steps`), mu = 0.1
on completions whose reward is above `--positive_reward_threshold` (0: correct), eps 0.2 / 0.28, no KL, 4 samples per
prompt (the paper uses 16, and a critic learning rate twice the actor's). The critic is the LoRA critic with
`--use_peft`, else `--value_model` (the paper initializes it from a reward model) or a full copy of the policy.

One GPU, LoRA policy and LoRA critic on a 1.5B instruct model, math with a verifiable reward (`pip install
math-verify` for accuracy_reward):

    python examples/vapo.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 --critic_learning_rate 2e-5 \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 4 --num_generations 8 \\
        --max_completion_length 1024 --value_pretrain_steps 50 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-1.5B-Instruct-VAPO --report_to trackio

Eight GPUs with DDP (or DeepSpeed / FSDP2: `deepspeed_zero3.yaml`, `fsdp2.yaml`; `--use_vllm` works as for PPO), 16
samples per prompt as in the paper:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/vapo.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --use_peft --lora_target_modules all-linear \\
        --learning_rate 1e-6 --critic_learning_rate 2e-6 \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 4 --num_generations 16 \\
        --max_completion_length 4096 \\
        --output_dir Qwen2.5-7B-Instruct-VAPO --report_to wandb

`trl-plus vapo <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("vapo")
