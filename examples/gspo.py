"""GSPO (arXiv 2507.18071): a sequence-level importance ratio (the geometric mean of the token ratios), clipped to
[1 - 3e-4, 1 + 4e-4], no KL.

The ratio only differs from 1 on off-policy updates: the commands below make 4 optimizer steps per generation
(`--steps_per_generation 4` with no gradient accumulation).

One GPU, LoRA on a 1.5B instruct model (`pip install math-verify` for accuracy_reward):

    python examples/gspo.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 \\
        --per_device_train_batch_size 8 --steps_per_generation 4 --num_generations 8 \\
        --max_completion_length 1024 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-1.5B-Instruct-GSPO --report_to trackio

Add `--load_in_4bit` for QLoRA (bitsandbytes, CUDA only).

Eight GPUs, DeepSpeed ZeRO-2 (GSPO was designed for MoE models such as Qwen3-30B-A3B: use deepspeed_zero3.yaml there):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/gspo.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --steps_per_generation 4 --num_generations 16 \\
        --max_completion_length 2048 \\
        --output_dir Qwen2.5-7B-Instruct-GSPO --report_to wandb

`trl-plus gspo <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("gspo")
