"""ReMax (arXiv 2310.10505): the greedy baseline is decoded in the same generate call and never trained on."""

import pytest
import torch
from conftest import digit_reward, make_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_plus
from trl_plus.algos import remax_advantages
from trl_plus.sampling import (
    GreedyRowsLogitsProcessor,
    greedy_last_in_vllm_server,
    greedy_row_mask,
    greedy_rows_in_vllm_colocate,
)


class RecordingReMaxTrainer(trl_plus.ReMaxTrainer):
    """Keeps every generated batch, the gathered rewards and the prompts it was generated for."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records.append(
            {
                "output": {k: v.clone() if torch.is_tensor(v) else v for k, v in output.items()},
                "rewards": self._last_rewards_per_func[:, 0].clone(),
                "prompts": [example["prompt"] for example in inputs],
            }
        )
        return output


@pytest.fixture
def remax_run(tiny_model_path, prompt_dataset, tmp_path):
    args = make_config(trl_plus.ReMaxConfig, tmp_path, max_steps=1)
    trainer = RecordingReMaxTrainer(
        model=tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=prompt_dataset
    )
    trainer.records = []
    trainer.train()
    return trainer, trainer.records[0]


def test_remax_advantages_golden():
    # Groups of 3, the last completion greedy: baselines 0.5 and 1.0.
    # Group 1: [1 - 0.5, 0 - 0.5, 0] ; group 2: [3 - 1, 1 - 1, 0]; a NaN baseline gives 0.
    rewards = torch.tensor([1.0, 0.0, 0.5, 3.0, 1.0, 1.0, 2.0, 2.0, float("nan")])
    torch.testing.assert_close(remax_advantages(rewards, 3), torch.tensor([0.5, -0.5, 0.0, 2.0, 0.0, 0.0, 0, 0, 0]))


def test_greedy_row_mask_marks_the_last_row_of_each_group_across_process_offsets():
    # Global rows 6..11 of groups of 4: rows 7 and 11 are last in their group (7 % 4 == 3, 11 % 4 == 3).
    assert greedy_row_mask(6, 6, 4).tolist() == [False, True, False, False, False, True]


def test_greedy_rows_logits_processor_keeps_sampled_rows_untouched():
    scores = torch.tensor([[0.1, 2.0, -1.0], [0.3, 0.2, 0.1]])
    processed = GreedyRowsLogitsProcessor(torch.tensor([True, False]))(None, scores)
    assert processed[0].tolist() == [-torch.inf, 0.0, -torch.inf]  # only the argmax (index 1) survives
    torch.testing.assert_close(processed[1], scores[1])


def test_greedy_rows_equal_a_separate_greedy_generate(remax_run, tiny_model_path):
    trainer, record = remax_run
    output = record["output"]
    is_greedy = greedy_row_mask(len(record["prompts"]), 0, trainer.num_generations)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)  # the weights the first generation used
    greedy_prompts = [prompt for prompt, greedy in zip(record["prompts"], is_greedy, strict=True) if greedy]
    encoded = tokenizer(greedy_prompts, return_tensors="pt", padding=True, padding_side="left")
    reference = model.generate(**encoded, do_sample=False, max_new_tokens=trainer.max_completion_length)
    reference = reference[:, encoded["input_ids"].size(1) :]
    generated = output["completion_ids"][is_greedy][:, : reference.size(1)]
    torch.testing.assert_close(generated, reference)
    # The sampled rows really are sampled (temperature 1): they are not all the greedy decode of their prompt.
    sampled = output["completion_ids"][~is_greedy]
    assert not all(torch.equal(row[: reference.size(1)], reference[0]) for row in sampled)


def test_advantages_are_reward_minus_greedy_reward_and_greedy_rows_are_masked(remax_run):
    trainer, record = remax_run
    output, rewards = record["output"], record["rewards"]
    grouped = rewards.view(-1, trainer.num_generations)
    expected = (grouped - grouped[:, -1:]).clone()
    expected[:, -1] = 0.0
    torch.testing.assert_close(output["advantages"], expected.reshape(-1))
    is_greedy = greedy_row_mask(len(rewards), 0, trainer.num_generations)
    assert output["completion_mask"][is_greedy].sum() == 0
    assert output["completion_mask"][~is_greedy].sum() > 0
    assert output["num_items_in_batch"] == output["completion_mask"].sum()
    history = trainer.state.log_history
    logged = [entry["remax/baseline_reward"] for entry in history if "remax/baseline_reward" in entry]
    assert logged == pytest.approx([grouped[:, -1].mean().item()])


def test_greedy_rows_never_enter_the_loss(remax_run):
    trainer, record = remax_run
    inputs = dict(record["output"])
    trainer.current_gradient_accumulation_steps = 1
    is_greedy = greedy_row_mask(inputs["advantages"].size(0), 0, trainer.num_generations)
    loss = trainer.compute_loss(trainer.model, inputs)
    # Change everything the loss could read on greedy rows: their advantages and their tokens.
    inputs["advantages"] = torch.where(is_greedy, torch.full_like(inputs["advantages"], 100.0), inputs["advantages"])
    inputs["completion_ids"] = inputs["completion_ids"].clone()
    inputs["completion_ids"][is_greedy] = (inputs["completion_ids"][is_greedy] + 1) % 10 + 3
    torch.testing.assert_close(trainer.compute_loss(trainer.model, inputs), loss)


def test_remax_rejects_unsupported_generation_backends_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="remax.*continuous_batching"):
        make_config(trl_plus.ReMaxConfig, tmp_path, use_transformers_continuous_batching=True)
    with pytest.raises(ValueError, match="remax.*vllm_tensor_parallel_size=1"):
        make_config(trl_plus.ReMaxConfig, tmp_path, use_vllm=True, vllm_tensor_parallel_size=2)
    assert make_config(trl_plus.ReMaxConfig, tmp_path, use_vllm=True).use_vllm


class FakeSamplingParams:
    """The part of vLLM's SamplingParams the colocate wrapper touches."""

    def __init__(self, temperature=1.0, top_p=0.9, top_k=50, min_p=0.1):
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p

    def clone(self):
        return FakeSamplingParams(self.temperature, self.top_p, self.top_k, self.min_p)


def test_vllm_colocate_decodes_greedy_rows_with_temperature_zero_in_the_same_call():
    calls = []

    class FakeLLM:
        def generate(self, prompts, sampling_params, use_tqdm=True):
            calls.append((prompts, sampling_params, use_tqdm))
            return ["done"]

    llm, params = FakeLLM(), FakeSamplingParams()
    with greedy_rows_in_vllm_colocate(llm, greedy_row_mask(4, 0, 2)):
        assert llm.generate(["a", "a", "b", "b"], sampling_params=params, use_tqdm=False) == ["done"]
    assert "generate" not in vars(llm)  # the class's method is back
    ((prompts, per_prompt, use_tqdm),) = calls  # one call for samples and greedy rows together
    assert prompts == ["a", "a", "b", "b"] and use_tqdm is False
    assert per_prompt[0] is params and per_prompt[2] is params  # sampled rows keep the user's parameters
    for greedy in (per_prompt[1], per_prompt[3]):
        assert (greedy.temperature, greedy.top_p, greedy.top_k, greedy.min_p) == (0.0, 1.0, -1, 0.0)
    assert params.temperature == 1.0  # the shared parameters were not modified


def test_vllm_server_returns_samples_then_the_greedy_decode_per_prompt():
    requests = []

    class FakeClient:
        def generate(self, prompts, n=1, temperature=1.0, max_tokens=16):
            requests.append({"n": n, "temperature": temperature, "max_tokens": max_tokens})
            # completion j of prompt p is [p, j, 0 if greedy else 1]
            tag = 0 if temperature == 0.0 else 1
            return {
                "prompt_ids": [[p] for p in prompts],
                "completion_ids": [[p, j, tag] for p in prompts for j in range(n)],
                "logprobs": [[-float(p)] for p in prompts for _ in range(n)],
                "logprob_token_ids": None,
            }

    client = FakeClient()
    with greedy_last_in_vllm_server(client):
        output = client.generate(prompts=[7, 8], n=3, temperature=0.7, max_tokens=5)
    assert "generate" not in vars(client)
    assert sorted(requests, key=lambda r: r["n"]) == [
        {"n": 1, "temperature": 0.0, "max_tokens": 5},  # the greedy request
        {"n": 2, "temperature": 0.7, "max_tokens": 5},  # G - 1 samples, the user's temperature
    ]
    assert output["prompt_ids"] == [[7], [8]]
    assert output["completion_ids"] == [[7, 0, 1], [7, 1, 1], [7, 0, 0], [8, 0, 1], [8, 1, 1], [8, 0, 0]]
    assert output["logprobs"] == [[-7.0]] * 3 + [[-8.0]] * 3
    assert output["logprob_token_ids"] is None
