r"""AI-feedback rewards (RLAIF, arXiv 2309.00267): a judge model scores each (prompt, completion).

`JudgeReward` formats every pair with a template and asks a judge, either a local causal LM or an OpenAI-compatible
server (`http://...`), in one of two modes:

- `verdict` (default): the reward is the expectation of the verdicts' values under the judge's next-token
  distribution restricted to the verdicts, `sum_v value_v * P(v) / sum_v P(v)`. With the default
  `{" Yes": 1.0, " No": 0.0}` that is `P(Yes) / (P(Yes) + P(No))`; with the values `{"1": 1, ..., "10": 10}` it is the
  paper's direct-RLAIF score (sec. 2.3: "a weighted score ... sum_i i * P(i)").
- `score`: the judge answers greedily and `parser` reads a number from the reply (default: its first number).

A completion the judge cannot score gets None, which TRL treats as "not scored by this function": in `score` mode a
reply without a number; in `verdict` mode over HTTP a reply whose top log-probabilities hold none of the verdicts; and
a malformed server reply when `on_malformed="none"` (the default; `"raise"` makes it an error). A server that cannot
be reached or does not reply in time is always an error, after the retries: a run must not train on silently
missing rewards. With `log_metric` (TRL passes it), `judge/none_ratio` is the share of completions left unscored.
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from numbers import Real
from typing import Any

from .judge_http import API_PATHS, JudgeReplyError, OpenAICompatibleJudge
from .text import message_text

DEFAULT_VERDICT_TEMPLATE = (
    "Is the response a correct and helpful answer to the prompt? Answer Yes or No.\n\n"
    "Prompt: {prompt}\n\nResponse: {completion}\n\nAnswer:"
)
DEFAULT_SCORE_TEMPLATE = (
    "Rate how correct and helpful the response is as an answer to the prompt, from 1 (worst) to 10 (best). "
    "Reply with the number only.\n\nPrompt: {prompt}\n\nResponse: {completion}\n\nScore:"
)
DEFAULT_VERDICTS = {" Yes": 1.0, " No": 0.0}
MODES = ("verdict", "score")
ON_MALFORMED = ("none", "raise")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str) -> float | None:
    """The first number in `text` as a float, or None when there is none.

    >>> parse_score(" 7/10, because ..."), parse_score("Score: -2.5"), parse_score("no idea")
    (7.0, -2.5, None)
    """
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def expected_verdict_value(logprobs: Sequence[float], values: Sequence[float]) -> float:
    """`sum_v values[v] * softmax(logprobs)[v]`: the verdict probabilities normalized over the verdicts only.

    `logprobs` are log-probabilities (any common offset cancels). Two verdicts at log(0.6) and log(0.2) with values
    1 and 0 give 0.6 / (0.6 + 0.2) = 0.75:

    >>> round(expected_verdict_value([math.log(0.6), math.log(0.2)], [1.0, 0.0]), 12)
    0.75
    """
    top = max(logprobs)
    weights = [math.exp(logprob - top) for logprob in logprobs]
    return sum(weight * value for weight, value in zip(weights, values, strict=True)) / sum(weights)


def _choice_error(field: str, value: Any, valid: Sequence) -> ValueError:
    return ValueError(f"`{field}` is {value!r}; valid: {', '.join(repr(choice) for choice in valid)}.")


class JudgeReward:
    r"""Reward from a judge model's verdict on each (prompt, completion) (RLAIF, arXiv 2309.00267).

    A TRL reward function: `reward(prompts=..., completions=..., **kwargs) -> list[float | None]`, picklable (a judge
    given as a path is loaded again, lazily, after unpickling).

    Args:
        judge: a local causal LM (a path or Hub id loaded with `AutoModelForCausalLM`, or a loaded model), or the URL
            of an OpenAI-compatible API root (`http://host:8000/v1`, e.g. `vllm serve <judge>`).
        mode: `verdict` (probability-weighted verdict values) or `score` (a number parsed from a greedy reply).
        template: a `str.format` template with `{prompt}` and `{completion}`; defaults to a Yes/No question
            (`verdict`) or a 1-10 rating (`score`).
        verdicts: verdict text -> value. Locally each verdict is a continuation of the formatted text, tokenized on
            its own (so `" Yes"` with its leading space, as BPE tokenizers spell a word after a colon) and scored
            with all its tokens; over HTTP only the first reply token is seen (the server's `top_logprobs`), so
            verdicts must be single tokens there, and they match tokens equal up to surrounding whitespace.
        parser: `score` mode: reply text -> float or None. Defaults to `parse_score` (the first number).
        max_new_tokens: `score` mode: the length of the judge's reply.
        batch_size: local judge: texts per forward pass; HTTP: concurrent requests.
        tokenizer: local judge given as a model: its tokenizer (default: loaded from the model's `name_or_path`).
        device: local judge: where it runs; default the accelerate process's device (the trainer's).
        model_kwargs: local judge given as a path: keyword arguments of `from_pretrained` (e.g. `dtype`).
        apply_chat_template: local judge: wrap the formatted text as a user message with the tokenizer's chat
            template (and generation prompt), as an instruction-tuned judge expects.
        api: HTTP: `completions` or `chat`. model_name, api_key: HTTP: sent as `model` and a bearer token.
        timeout, max_retries, backoff: HTTP: seconds per reply; further attempts after a transport failure, the
            n-th after `backoff * 2**n` seconds.
        top_logprobs: HTTP `verdict` mode: how many first-token alternatives to ask for.
        on_malformed: HTTP: a reply without the requested fields gives None (`none`) or raises (`raise`).

    >>> reward = JudgeReward("http://127.0.0.1:8000/v1", api="chat", model_name="judge")
    >>> reward
    JudgeReward(judge='http://127.0.0.1:8000/v1', mode='verdict', verdicts={' Yes': 1.0, ' No': 0.0})
    """

    __name__ = "judge_reward"

    def __init__(
        self,
        judge: Any,
        mode: str = "verdict",
        template: str | None = None,
        verdicts: Mapping[str, float] | None = None,
        parser: Callable[[str], float | None] = parse_score,
        max_new_tokens: int = 8,
        batch_size: int = 8,
        tokenizer: Any = None,
        device: Any = None,
        model_kwargs: dict | None = None,
        apply_chat_template: bool = False,
        api: str = "completions",
        model_name: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        top_logprobs: int = 20,
        on_malformed: str = "none",
    ):
        if not isinstance(judge, str) and not callable(getattr(judge, "forward", None)):
            raise ValueError(
                f"`judge` is a {type(judge).__name__}; valid: a model path or Hub id, an http(s):// API root, or a "
                "loaded causal LM."
            )
        if not callable(parser):
            raise ValueError(f"`parser` is {parser!r}; valid: a callable from the reply text to a float or None.")
        if mode not in MODES:
            raise _choice_error("mode", mode, MODES)
        if api not in API_PATHS:
            raise _choice_error("api", api, tuple(API_PATHS))
        if on_malformed not in ON_MALFORMED:
            raise _choice_error("on_malformed", on_malformed, ON_MALFORMED)
        if template is None:
            template = DEFAULT_SCORE_TEMPLATE if mode == "score" else DEFAULT_VERDICT_TEMPLATE
        try:
            template.format(prompt="", completion="")
        except (KeyError, IndexError, ValueError, AttributeError) as error:
            raise ValueError(
                f"`template` is {template!r:.80}; it must be a str.format template whose only fields are "
                "{prompt} and {completion}."
            ) from error
        if "{completion}" not in template:
            raise ValueError(f"`template` is {template!r:.80}; it must contain {{completion}}.")
        verdicts = dict(DEFAULT_VERDICTS if verdicts is None else verdicts)
        if len(verdicts) < 2 or not all(
            isinstance(key, str) and key and isinstance(value, Real) and not isinstance(value, bool)
            for key, value in verdicts.items()
        ):
            raise ValueError(
                f"`verdicts` is {verdicts!r}; it must map at least two non-empty verdict strings to numbers, "
                'e.g. {" Yes": 1.0, " No": 0.0}.'
            )
        for field, value, minimum in (
            ("max_new_tokens", max_new_tokens, 1),
            ("batch_size", batch_size, 1),
            ("max_retries", max_retries, 0),
            ("top_logprobs", top_logprobs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{field}` is {value!r}; valid: an int >= {minimum}.")
        for field, value in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0 or math.isinf(value):
                raise ValueError(f"`{field}` is {value!r}; valid: a finite number of seconds >= 0.")
        if not timeout > 0:
            raise ValueError(f"`timeout` is {timeout!r}; valid: a finite number of seconds > 0.")

        self.judge = judge
        self.mode = mode
        self.template = template
        self.verdicts = {key: float(value) for key, value in verdicts.items()}
        self.parser = parser
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        self.model_kwargs = dict(model_kwargs or {})
        self.apply_chat_template = apply_chat_template
        self.top_logprobs = top_logprobs
        self.on_malformed = on_malformed
        self.is_http = isinstance(judge, str) and judge.startswith(("http://", "https://"))
        self.client = (
            OpenAICompatibleJudge(judge, api, model_name, api_key, timeout, max_retries, backoff)
            if self.is_http
            else None
        )
        self._model = None if isinstance(judge, str) else judge
        self._tokenizer = tokenizer

    # -----------------------------------------------------------------------------------------------------------------
    # The reward
    # -----------------------------------------------------------------------------------------------------------------

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts for {len(completions)} completions.")
        texts = [
            self.template.format(prompt=message_text(prompt), completion=message_text(completion))
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        rewards = self._score_http(texts) if self.is_http else self._score_local(texts)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None and rewards:
            log_metric("judge/none_ratio", sum(reward is None for reward in rewards) / len(rewards))
        return rewards

    def _score_http(self, texts: list[str]) -> list[float | None]:
        with ThreadPoolExecutor(max_workers=min(self.batch_size, max(len(texts), 1))) as pool:
            return list(pool.map(self._score_one_http, texts))

    def _score_one_http(self, text: str) -> float | None:
        try:
            if self.mode == "score":
                return self.parser(self.client.generate(text, self.max_new_tokens))
            found = self.client.verdict_logprobs(text, list(self.verdicts), self.top_logprobs)
        except JudgeReplyError:
            if self.on_malformed == "raise":
                raise
            return None
        if not found:  # none of the verdicts among the judge's top alternatives: no verdict to weigh
            return None
        return expected_verdict_value(list(found.values()), [self.verdicts[verdict] for verdict in found])

    # -----------------------------------------------------------------------------------------------------------------
    # Local judge
    # -----------------------------------------------------------------------------------------------------------------

    def _load(self):
        """The judge model and tokenizer on `device`, loaded on first use. A judge given as a model is used in the
        mode it is in (`from_pretrained` gives eval mode): it may be the policy itself, whose mode the trainer owns."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._model is None:
            self._model = AutoModelForCausalLM.from_pretrained(self.judge, **self.model_kwargs).eval()
        if self._tokenizer is None:
            source = self.judge if isinstance(self.judge, str) else self._model.name_or_path
            self._tokenizer = AutoTokenizer.from_pretrained(source)
        if self.device is None:
            from accelerate import PartialState

            device = PartialState().device  # the trainer's process device
        else:
            device = torch.device(self.device)
        if self._model.device != device:
            self._model.to(device)
        return self._model, self._tokenizer

    def _judge_inputs(self, tokenizer, texts: list[str]) -> list[list[int]]:
        if not self.apply_chat_template:
            return [tokenizer(text)["input_ids"] for text in texts]
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for text in texts
        ]

    def _score_local(self, texts: list[str]) -> list[float | None]:
        import torch

        model, tokenizer = self._load()
        contexts = self._judge_inputs(tokenizer, texts)
        rewards: list[float | None] = []
        with torch.inference_mode():
            for start in range(0, len(contexts), self.batch_size):
                batch = contexts[start : start + self.batch_size]
                if self.mode == "score":
                    rewards.extend(self._generate_scores(model, tokenizer, batch))
                else:
                    rewards.extend(self._verdict_values(model, tokenizer, batch))
        return rewards

    def _verdict_values(self, model, tokenizer, contexts: list[list[int]]) -> list[float]:
        """Teacher-forced `log P(verdict | context)` of every verdict (the sum over its tokens), then their
        normalized expectation. One right-padded forward pass scores every (context, verdict) pair of the batch."""
        import torch

        verdict_ids = [tokenizer(verdict, add_special_tokens=False)["input_ids"] for verdict in self.verdicts]
        empty = [verdict for verdict, ids in zip(self.verdicts, verdict_ids, strict=True) if not ids]
        if empty:
            raise ValueError(f"`verdicts` {empty} tokenize to no tokens with the judge's tokenizer.")
        sequences = [context + ids for context in contexts for ids in verdict_ids]
        length = max(len(sequence) for sequence in sequences)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        values = list(self.verdicts.values())
        results = []
        for index, context in enumerate(contexts):
            logprobs = []
            for offset, ids in enumerate(verdict_ids):
                row = index * len(verdict_ids) + offset
                # The logits at position t predict token t + 1: the verdict's tokens follow the context's last one.
                positions = torch.arange(len(context) - 1, len(context) - 1 + len(ids), device=logits.device)
                token_logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)
                targets = torch.tensor(ids, device=logits.device)[:, None]
                logprobs.append(token_logprobs.gather(-1, targets).sum().item())
            results.append(expected_verdict_value(logprobs, values))
        return results

    def _generate_scores(self, model, tokenizer, contexts: list[list[int]]) -> list[float | None]:
        """Greedy replies of at most `max_new_tokens` tokens (left-padded batch), each read by `parser`."""
        import torch

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(context) for context in contexts)
        input_ids = torch.full((len(contexts), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(contexts), length), dtype=torch.long)
        for row, context in enumerate(contexts):
            input_ids[row, length - len(context) :] = torch.tensor(context)
            attention_mask[row, length - len(context) :] = 1
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        replies = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        return [self.parser(reply) for reply in replies]

    # -----------------------------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.judge, str):  # reloaded from the path on first use after unpickling
            state["_model"] = None
        return state

    def __repr__(self) -> str:
        judge = self.judge if isinstance(self.judge, str) else type(self.judge).__name__
        parser = getattr(self.parser, "__name__", self.parser)
        extra = f"verdicts={self.verdicts}" if self.mode == "verdict" else f"parser={parser}"
        return f"{type(self).__name__}(judge={judge!r}, mode={self.mode!r}, {extra})"
