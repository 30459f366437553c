"""RLOO (arXiv 2402.14740): each completion's baseline is the mean reward of the other completions of its prompt, no
std scaling, no KL.

One GPU, LoRA on a 0.5B instruct model, GSM8K as plain text made into chat messages (answer_match_reward reads
GSM8K's `#### 42` answers; no extra install):

    python examples/rloo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name openai/gsm8k --dataset_config main \\
        --prompt_column question --solution_column answer \\
        --system_prompt "Reason step by step, then put the final answer in \\boxed{}." \\
        --reward_funcs answer_match_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 2e-5 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --num_generations 4 \\
        --max_completion_length 512 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-0.5B-Instruct-RLOO --report_to trackio

Add `--load_in_4bit` for QLoRA (bitsandbytes, CUDA only).

Eight GPUs, DeepSpeed ZeRO-2 (`pip install math-verify` for accuracy_reward):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/rloo.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_generations 8 \\
        --max_completion_length 2048 \\
        --output_dir Qwen2.5-7B-Instruct-RLOO --report_to wandb

`trl-plus rloo <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("rloo")
