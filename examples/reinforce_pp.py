"""REINFORCE++ (arXiv 2501.03262): k1 KL folded into the token reward, advantages whitened over the global batch,
PPO clip 0.2, token-level loss.

The paper uses beta = 0.001 for math (the preset's default is 0.01). With `--use_peft` the reference model is the
base model with the adapter disabled, so no second copy of the model is loaded.

One GPU, LoRA on a 1.5B instruct model (`pip install math-verify` for accuracy_reward):

    python examples/reinforce_pp.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --beta 0.001 \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --num_generations 8 \\
        --max_completion_length 1024 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-1.5B-Instruct-REINFORCE-PP --report_to trackio

Add `--advantage_estimator reinforce_pp_baseline` for REINFORCE++-baseline (the group mean is subtracted first), and
`--load_in_4bit` for QLoRA (bitsandbytes, CUDA only).

Eight GPUs, DeepSpeed ZeRO-3 (the reference model is sharded too):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/reinforce_pp.py \\
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward \\
        --beta 0.001 \\
        --learning_rate 1e-6 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_generations 8 \\
        --max_completion_length 2048 \\
        --output_dir Qwen2.5-7B-Instruct-REINFORCE-PP --report_to wandb

`trl-plus reinforce_pp <same flags>` runs the same script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("reinforce_pp")
