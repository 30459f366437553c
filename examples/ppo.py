"""PPO with a critic (InstructGPT-style, arXiv 2203.02155): GAE on KL-shaped token rewards, clipped value loss,
adaptive KL (arXiv 1909.08593), several PPO epochs and mini-batches per generation batch.

The critic: with `--use_peft`, a second LoRA adapter plus a value head on the policy's own base model (one copy of the
base weights serves the policy, the critic and the reference); `--value_model <path>` gives a separate critic instead
(e.g. a reward-model checkpoint, whose `score` head becomes the value head); a full fine-tuned policy with no
`--value_model` gets a full critic copied from the policy's checkpoint.

One GPU, LoRA policy and LoRA critic on a 0.5B instruct model, GSM8K with trl_plus's answer-matching reward:

    python examples/ppo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name openai/gsm8k --dataset_config main \\
        --prompt_column question --solution_column answer \\
        --system_prompt "Reason step by step, then put the final answer in \\boxed{}." \\
        --reward_funcs answer_match_reward \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 --critic_learning_rate 2e-5 \\
        --beta 0.05 --kl_estimator k1 --kl_target 6.0 --gamma 1.0 --lam 0.95 \\
        --num_generations 1 --per_device_train_batch_size 16 --gradient_accumulation_steps 4 \\
        --num_iterations 2 --max_completion_length 512 \\
        --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-0.5B-Instruct-PPO --report_to tensorboard

Add `--use_vllm --vllm_mode colocate` to generate with vLLM on the same GPU: at every weight sync vLLM receives
the policy only (its adapter merged into the base weights), never the critic.

Eight GPUs with DDP (DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 work too: `deepspeed_zero3.yaml`, `fsdp2.yaml`), a reward
model added to the verifiable reward, and a copy of the reward model as the critic:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/ppo.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward --reward_model_name_or_path my-org/Qwen2.5-1.5B-Reward \\
        --value_model my-org/Qwen2.5-1.5B-Reward \\
        --use_peft --lora_target_modules all-linear \\
        --learning_rate 1e-5 --critic_learning_rate 2e-5 --vf_coef 0.1 --cliprange_value 0.2 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_generations 2 \\
        --max_completion_length 1024 \\
        --output_dir Qwen2.5-1.5B-Instruct-PPO --report_to wandb

The checkpoint holds the policy, the critic (`critic/`: its adapter and `value_head.safetensors`, or `value_model/`),
the optimizer state of both and the KL controller (`ppo_state.json`). `trl-plus ppo <same flags>` runs the same
script; `--help` lists every flag.
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("ppo")
