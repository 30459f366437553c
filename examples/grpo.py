"""GRPO (arXiv 2402.03300): TRL's GRPO, plus every trl_plus option as a flag.

One GPU, LoRA on a 0.5B instruct model, GSM8K as plain text made into chat messages, with trl_plus's answer-matching
reward (no extra install):

    python examples/grpo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name openai/gsm8k --dataset_config main \\
        --prompt_column question --solution_column answer \\
        --system_prompt "Reason step by step, then put the final answer in \\boxed{}." \\
        --reward_funcs answer_match_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 2e-5 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --num_generations 8 \\
        --max_completion_length 512 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-0.5B-Instruct-GRPO --report_to tensorboard

The trl_plus options combine freely: `--advantage_estimator rloo|reinforce_pp|reinforce_pp_baseline`,
`--loss_type aspo|clip_cov|kl_cov`, `--dual_clip_c 3.0`, `--beta 0.01 --kl_estimator k1 --kl_in_reward`,
`--dynamic_sampling`, `--overlong_buffer_len 128`. Add `--load_in_4bit` for QLoRA (bitsandbytes, CUDA only).

Eight GPUs, DeepSpeed ZeRO-2, vLLM generation (`pip install 'trl-plus[vllm]'`):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/grpo.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward think_format_reward \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_generations 16 \\
        --max_completion_length 2048 \\
        --use_vllm --vllm_mode colocate \\
        --output_dir Qwen2.5-7B-Instruct-GRPO --report_to wandb

`trl-plus grpo <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("grpo")
