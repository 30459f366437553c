"""Classic RLHF (InstructGPT, arXiv 2203.02155): a Bradley-Terry reward model trained by TRL's RewardTrainer, then PPO
against it with a LoRA policy and a LoRA critic initialized from the reward model (its score head becomes the value
head), a KL penalty to the supervised policy in the reward, reward normalization and, optionally, PPO-ptx.

One GPU, a 0.5B instruct model as the supervised policy, UltraFeedback pairs for the reward model and their prompts
for PPO:

    python examples/rlhf.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --preference_dataset_name trl-lib/ultrafeedback_binarized \\
        --reward_max_steps 1000 --reward_learning_rate 1e-5 --reward_per_device_train_batch_size 8 \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 1e-5 --critic_learning_rate 2e-5 \\
        --beta 0.05 --kl_target 6.0 --normalize_reward --reward_clip 5.0 \\
        --num_generations 1 --per_device_train_batch_size 16 --gradient_accumulation_steps 4 \\
        --max_completion_length 256 --max_steps 500 --logging_steps 5 \\
        --output_dir Qwen2.5-0.5B-RLHF --report_to tensorboard

With a reward model trained already, skip step 1 with `--reward_model_name_or_path my-org/Qwen2.5-0.5B-Reward`.
PPO-ptx (InstructGPT's mix of a language-model loss on pretraining text, to avoid regressions): add
`--ptx_dataset_name my_text.jsonl --ptx_coef 0.5` (a `text` column). The same pipeline runs on CPU in a few minutes
on a toy task built locally: `trl-plus demo --rlhf`. `trl-plus rlhf <same flags>` runs this script; `--help` lists
every flag.
"""

from trl_plus.scripts.rlhf import main

if __name__ == "__main__":
    main()
