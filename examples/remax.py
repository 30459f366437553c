"""ReMax (arXiv 2310.10505): the greedy decode of each prompt, scored by the same rewards, is the baseline.

The last completion of each group is decoded greedily in the same generate call as the samples and is not trained
on, so each prompt gets num_generations - 1 samples. One GPU, LoRA on a 1.5B instruct model, math with a verifiable
reward (`pip install math-verify` for accuracy_reward):

    python examples/remax.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 5e-6 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --num_generations 8 \\
        --max_completion_length 1024 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-1.5B-Instruct-ReMax --report_to trackio

Eight GPUs, full fine-tuning of a 7B model with DeepSpeed ZeRO-2 and colocated vLLM generation (greedy rows get
temperature 0 in the same vLLM call):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/remax.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_generations 8 \\
        --max_completion_length 4096 \\
        --use_vllm --vllm_mode colocate \\
        --output_dir Qwen2.5-7B-Instruct-ReMax --report_to wandb

`trl-plus remax <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("remax")
