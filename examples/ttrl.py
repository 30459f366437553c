"""TTRL (arXiv 2504.16084): reinforcement learning on unlabeled prompts with a majority-vote pseudo-label.

Each prompt's completions vote (their final answer: the last `\\boxed{}` or number); a completion is rewarded 1 when
it agrees with the group's majority. The reward never reads the dataset's labels: train on a test set's prompts
with their answers hidden. When the dataset has an `answer`/`solution`/`label` column, it is only used to log
`ttrl/label_accuracy` (how often the majority is right). TTRL needs a model that already solves some prompts and
sampling at temperature 1 with many votes: the paper votes over 64 completions per prompt and trains on 32
(`--ttrl_num_votes 64 --num_generations 32`: the 32 vote-only completions are generated, counted in
`generation/completions`, and never reach the loss). For a tie between the top answers to give no reward instead of
going to the first answer, build `MajorityVoteReward(ties="none")` in a script of your own.

    python examples/ttrl.py \\
        --model_name_or_path Qwen/Qwen2.5-Math-1.5B \\
        --dataset_name HuggingFaceH4/MATH-500 --dataset_train_split test \\
        --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \\
        --learning_rate 5e-6 --temperature 1.0 \\
        --per_device_train_batch_size 32 --gradient_accumulation_steps 2 --num_generations 32 --ttrl_num_votes 64 \\
        --max_completion_length 1024 \\
        --max_steps 200 --logging_steps 5 \\
        --output_dir Qwen2.5-Math-1.5B-TTRL --report_to trackio

Eight GPUs with DeepSpeed ZeRO-2 and colocated vLLM generation (the vote gathers whole groups across processes):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/ttrl.py \\
        --model_name_or_path Qwen/Qwen2.5-Math-7B \\
        --dataset_name HuggingFaceH4/MATH-500 --dataset_train_split test \\
        --learning_rate 1e-6 --temperature 1.0 \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 2 --num_generations 32 --ttrl_num_votes 64 \\
        --max_completion_length 3072 \\
        --use_vllm --vllm_mode colocate \\
        --output_dir Qwen2.5-Math-7B-TTRL --report_to wandb

`trl-plus ttrl <same flags>` runs the same script (its default reward is majority_vote_reward).
"""

from trl_plus.scripts.train import main

if __name__ == "__main__":
    main("ttrl")
