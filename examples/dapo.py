"""DAPO (arXiv 2503.14476): Clip-Higher, dynamic sampling, token-level loss, no KL, overlong filtering and shaping.

One GPU, LoRA on a 1.5B instruct model, math with a verifiable reward (`pip install math-verify` for
accuracy_reward):

    python examples/dapo.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --num_generations 8 \\
        --max_completion_length 1024 --overlong_buffer_len 256 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-1.5B-Instruct-DAPO --report_to trackio

Add `--load_in_4bit` for QLoRA (bitsandbytes, CUDA only). `--report_to` takes wandb, trackio or tensorboard.

Eight GPUs, full fine-tuning of a 7B model with DeepSpeed ZeRO-2 and vLLM generation (`pip install
'trl-plus[vllm]'`; drop the two vLLM flags to generate with transformers):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/dapo.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_generations 16 \\
        --max_completion_length 4096 --overlong_buffer_len 1024 \\
        --use_vllm --vllm_mode colocate \\
        --output_dir Qwen2.5-7B-Instruct-DAPO --report_to wandb

Models of 14B and more: `deepspeed_zero3.yaml`. `trl-plus dapo <same flags>` runs the same script; `--help` lists
every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("dapo")
