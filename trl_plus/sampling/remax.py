"""ReMax's greedy baseline decoded with the sampled completions (arXiv 2310.10505).

The greedy completion of a prompt is the last of its group. transformers and colocated vLLM decode it in the same
`generate` call as the samples (a per-row logits processor, per-request sampling parameters); the vLLM server,
whose API takes one set of sampling parameters per request, gets two requests sent together.
"""

import functools
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def greedy_row_mask(num_rows: int, row_offset: int, group_size: int) -> torch.Tensor:
    """`(num_rows,)` bool: the rows that are the last of their group (global index `row_offset + i`).

    >>> greedy_row_mask(4, 2, 3)
    tensor([ True, False, False,  True])
    """
    return (row_offset + torch.arange(num_rows)) % group_size == group_size - 1


class GreedyRowsLogitsProcessor(LogitsProcessor):
    """Turns sampling into greedy decoding for the chosen rows: every logit but the row's argmax becomes -inf.

    Placed after the other processors, the argmax is that of the processed scores, as `do_sample=False` would pick.
    """

    def __init__(self, greedy_rows: torch.Tensor):
        self.greedy_rows = greedy_rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy_scores = torch.full_like(scores, -torch.inf)
        greedy_scores.scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
        rows = self.greedy_rows.to(scores.device).unsqueeze(1)
        return torch.where(rows, greedy_scores, scores)


@contextmanager
def greedy_rows_in_generate(model, greedy_rows: torch.Tensor):
    """Within the block, `model.generate` decodes `greedy_rows` greedily and samples the other rows."""
    processors = LogitsProcessorList([GreedyRowsLogitsProcessor(greedy_rows)])
    model.generate = functools.partial(model.generate, logits_processor=processors)
    try:
        yield
    finally:
        del model.generate  # the instance attribute; the class's method is visible again


@contextmanager
def greedy_rows_in_vllm_colocate(llm, greedy_rows: torch.Tensor):
    """Within the block, `llm.generate(prompts, sampling_params=...)` decodes `greedy_rows` with temperature 0."""

    def generate(prompts, sampling_params, **kwargs):
        greedy_params = sampling_params.clone()
        greedy_params.temperature, greedy_params.top_p, greedy_params.top_k, greedy_params.min_p = 0.0, 1.0, -1, 0.0
        per_prompt = [greedy_params if greedy else sampling_params for greedy in greedy_rows.tolist()]
        return original(prompts, sampling_params=per_prompt, **kwargs)

    original = llm.generate
    llm.generate = generate
    try:
        yield
    finally:
        del llm.generate


def append_greedy_completions(sampled: dict, greedy: dict, samples_per_prompt: int) -> dict:
    """Merge two vLLM-client results so each prompt's completions are its samples followed by its greedy decode.

    >>> sampled = {"prompt_ids": [[1], [2]], "completion_ids": [[5], [6], [7], [8]], "logprobs": None}
    >>> greedy = {"prompt_ids": [[1], [2]], "completion_ids": [[9], [0]], "logprobs": None}
    >>> append_greedy_completions(sampled, greedy, 2)["completion_ids"]
    [[5], [6], [9], [7], [8], [0]]
    """
    merged = {"prompt_ids": sampled["prompt_ids"]}
    for key in sampled.keys() - {"prompt_ids"}:
        if sampled[key] is None:
            merged[key] = None
            continue
        merged[key] = []
        for index, greedy_value in enumerate(greedy[key]):
            merged[key] += [*sampled[key][index * samples_per_prompt : (index + 1) * samples_per_prompt], greedy_value]
    return merged


@contextmanager
def greedy_last_in_vllm_server(client):
    """Within the block, `client.generate(prompts, n=G, ...)` returns G - 1 samples and, last, the greedy decode per
    prompt; the two requests are sent together so the server batches them."""

    def generate(prompts, n, **kwargs):
        with ThreadPoolExecutor(max_workers=2) as pool:
            sampled = pool.submit(original, prompts=prompts, n=n - 1, **kwargs)
            greedy = pool.submit(original, prompts=prompts, n=1, **{**kwargs, "temperature": 0.0})
            return append_greedy_completions(sampled.result(), greedy.result(), n - 1)

    original = client.generate
    client.generate = generate
    try:
        yield
    finally:
        del client.generate
