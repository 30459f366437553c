"""ASPO (arXiv 2510.06062): flipped importance weights for positive-advantage tokens, hard masks and a soft dual clip,
token-level loss, no KL.

ASPO reweights off-policy tokens: the commands below make 2 optimizer steps per generation, as Archer2.0 does
(`--steps_per_generation 2` with no gradient accumulation).

One GPU, LoRA on a 1.5B instruct model (`pip install math-verify` for accuracy_reward):

    python examples/aspo.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 \\
        --per_device_train_batch_size 16 --steps_per_generation 2 --num_generations 8 \\
        --max_completion_length 1024 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-1.5B-Instruct-ASPO --report_to trackio

Add `--load_in_4bit` for QLoRA (bitsandbytes, CUDA only).

Eight GPUs, DeepSpeed ZeRO-2:

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/aspo.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --steps_per_generation 2 --num_generations 16 \\
        --max_completion_length 2048 \\
        --output_dir Qwen2.5-7B-Instruct-ASPO --report_to wandb

`trl-plus aspo <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("aspo")
