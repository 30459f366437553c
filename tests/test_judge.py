"""JudgeReward (RLAIF, arXiv 2309.00267): a local judge's verdict probabilities by hand, and the HTTP path against a
stub OpenAI-compatible server on 127.0.0.1 (success, malformed replies, a slow server, a closed port)."""

import json
import math
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import make_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_plus
from trl_plus.rewards import JudgeReward
from trl_plus.rewards.judge import expected_verdict_value, parse_score

TEMPLATE = "q {prompt} a {completion} ok?"
PROMPTS = ["1+1=", "12+30=", "7="]
COMPLETIONS = ["2", "42", "9 9 9"]


def hand_verdict_probability(model, tokenizer, text: str, verdicts: dict) -> float:
    """P(v | text) for each verdict, from one unpadded forward pass per (text, verdict), normalized over the
    verdicts and weighted by their values: sum_v value_v P(v) / sum_v P(v)."""
    probabilities, values = [], []
    for verdict, value in verdicts.items():
        context = tokenizer(text)["input_ids"]
        ids = tokenizer(verdict, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([context + ids])).logits[0]
        # log P(verdict) = sum_i log softmax(logits[len(context) - 1 + i])[ids[i]]
        logp = sum(torch.log_softmax(logits[len(context) - 1 + i], -1)[token].item() for i, token in enumerate(ids))
        probabilities.append(math.exp(logp))
        values.append(value)
    return sum(p * v for p, v in zip(probabilities, values, strict=True)) / sum(probabilities)


@pytest.fixture(scope="module")
def judge(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.mark.parametrize(
    "verdicts",
    [
        {"y": 1.0, "n": 0.0},  # single tokens: P(y) / (P(y) + P(n))
        {"yes": 1.0, "no": 0.0},  # three and two characters: products of the tokens' probabilities
        {"1": 1.0, "2": 2.0, "3": 3.0},  # direct RLAIF: the expected score
    ],
)
def test_local_verdicts_equal_hand_computed_probabilities(tiny_model_path, judge, verdicts):
    model, tokenizer = judge
    reward = JudgeReward(tiny_model_path, template=TEMPLATE, verdicts=verdicts, batch_size=2, device="cpu")
    got = reward(prompts=PROMPTS, completions=COMPLETIONS)
    texts = [TEMPLATE.format(prompt=p, completion=c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    expected = [hand_verdict_probability(model, tokenizer, text, verdicts) for text in texts]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    low, high = min(verdicts.values()), max(verdicts.values())
    assert all(low < value < high for value in got)
    # The prompts differ in length, so the batch of two is padded: padding must not change any score.
    assert JudgeReward(model, tokenizer=tokenizer, template=TEMPLATE, verdicts=verdicts, batch_size=1)(
        prompts=PROMPTS, completions=COMPLETIONS
    ) == pytest.approx(got, rel=1e-5)


def test_local_judge_reads_chat_messages_and_logs_none_ratio(judge):
    model, tokenizer = judge
    reward = JudgeReward(model, tokenizer=tokenizer, template=TEMPLATE, verdicts={"y": 1, "n": 0})
    logged = {}
    chat = reward(
        prompts=[[{"role": "user", "content": "1+1="}]],
        completions=[[{"role": "assistant", "content": "2"}]],
        log_metric=logged.__setitem__,
    )
    assert chat == reward(prompts=["1+1="], completions=["2"])
    assert logged == {"judge/none_ratio": 0.0}


def test_local_score_mode_parses_greedy_reply(tiny_model_path, judge):
    model, tokenizer = judge
    texts = [TEMPLATE.format(prompt=p, completion=c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    replies = []
    for text in texts:  # one unpadded greedy generation per text
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        output = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
    seen = []

    def parser(reply):
        seen.append(reply)
        return float(len(reply))  # a number every reply has, so the test checks the reply text itself

    reward = JudgeReward(tiny_model_path, mode="score", template=TEMPLATE, parser=parser, max_new_tokens=6)
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [float(len(reply)) for reply in replies]
    assert seen == replies  # the left-padded batch generates what each text generates alone


def test_parse_score_and_expected_value():
    assert parse_score("score: 8 out of 10") == 8.0
    assert parse_score("-0.25") == -0.25
    assert parse_score("none") is None
    # P = (0.5, 0.3, 0.2) over values (1, 2, 3) -> 0.5 + 0.6 + 0.6 = 1.7; a common log offset cancels.
    logprobs = [math.log(0.5) - 4.0, math.log(0.3) - 4.0, math.log(0.2) - 4.0]
    assert expected_verdict_value(logprobs, [1.0, 2.0, 3.0]) == pytest.approx(1.7)


def test_pickle_round_trip_reloads_path_judge(tiny_model_path):
    reward = JudgeReward(tiny_model_path, template=TEMPLATE, verdicts={"y": 1, "n": 0})
    before = reward(prompts=PROMPTS, completions=COMPLETIONS)
    payload = pickle.dumps(reward)
    assert len(payload) < 20_000  # the loaded weights are not in the pickle: the path is reloaded
    assert pickle.loads(payload)(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(before, rel=1e-6)
    http = pickle.loads(pickle.dumps(JudgeReward("http://127.0.0.1:1/v1", api="chat", timeout=3)))
    assert (http.client.url, http.client.timeout) == ("http://127.0.0.1:1/v1/chat/completions", 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="vote"), "`mode` is 'vote'; valid: 'verdict', 'score'"),
        (dict(api="responses"), "`api` is 'responses'; valid: 'completions', 'chat'"),
        (dict(on_malformed="skip"), "`on_malformed` is 'skip'; valid: 'none', 'raise'"),
        (dict(template="judge {response}"), "`template` is"),
        (dict(template="judge {prompt}"), "must contain {completion}"),
        (dict(verdicts={"Yes": 1.0}), "`verdicts` is {'Yes': 1.0}"),
        (dict(verdicts={"Yes": "1", "No": 0}), "`verdicts` is"),
        (dict(batch_size=0), "`batch_size` is 0; valid: an int >= 1"),
        (dict(max_retries=-1), "`max_retries` is -1; valid: an int >= 0"),
        (dict(timeout=0), "`timeout` is 0; valid"),
        (dict(backoff=float("nan")), "`backoff` is nan; valid"),
        (dict(parser="first number"), "`parser` is 'first number'; valid: a callable"),
        (dict(judge=None), "`judge` is a NoneType; valid: a model path"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    kwargs = {"judge": "http://127.0.0.1:1/v1", **kwargs}
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        JudgeReward(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# HTTP: a stub OpenAI-compatible server
# ---------------------------------------------------------------------------------------------------------------------


class StubJudge(ThreadingHTTPServer):
    """Answers every POST with `reply(path, payload)` -> (status, body), after `delay` seconds; records requests."""

    daemon_threads = True

    def __init__(self, reply, delay: float = 0.0):
        self.reply, self.delay, self.requests = reply, delay, []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N805 - the server is `self` of the enclosing scope
                payload = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                self.requests.append((handler.path, payload))
                time.sleep(self.delay)
                status, body = self.reply(handler.path, payload)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    handler.send_response(status)
                    handler.send_header("Content-Type", "application/json")
                    handler.send_header("Content-Length", str(len(data)))
                    handler.end_headers()
                    handler.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def completions_reply(path, payload):
    """/v1/completions with first-token top_logprobs: the judge says Yes at log(0.6) (split over " Yes" 0.5 and
    "Yes" 0.1, which add) and No at log(0.2), whatever the text, except a text containing "nothing" (no verdict)."""
    if "nothing" in payload["prompt"]:
        top = {" maybe": math.log(0.9)}
    else:
        top = {" Yes": math.log(0.5), "Yes": math.log(0.1), " No": math.log(0.2), " the": math.log(0.1)}
    return 200, {"choices": [{"text": " Yes", "logprobs": {"tokens": [" Yes"], "top_logprobs": [top]}}]}


def test_http_completions_verdict_probability():
    with StubJudge(completions_reply) as server:
        reward = JudgeReward(server.url, model_name="judge-7b", api_key="secret", top_logprobs=5)
        logged = {}
        got = reward(prompts=["p1", "p2", "p3"], completions=["a", "nothing", "c"], log_metric=logged.__setitem__)
    # P(Yes) = 0.5 + 0.1 = 0.6, P(No) = 0.2: 0.6 / (0.6 + 0.2) = 0.75; no verdict among the alternatives: None.
    assert got[0] == pytest.approx(0.75) and got[2] == pytest.approx(0.75) and got[1] is None
    assert logged == {"judge/none_ratio": pytest.approx(1 / 3)}
    paths = {path for path, _ in server.requests}
    assert paths == {"/v1/completions"}
    payload = next(payload for _, payload in server.requests if "p1" in payload["prompt"])
    assert payload["model"] == "judge-7b" and payload["logprobs"] == 5 and payload["max_tokens"] == 1
    assert payload["prompt"] == reward.template.format(prompt="p1", completion="a")


def test_http_chat_verdict_and_score_modes():
    def reply(path, payload):
        assert path == "/v1/chat/completions" and payload["messages"][0]["role"] == "user"
        if payload.get("logprobs"):
            top = [{"token": "Yes", "logprob": math.log(0.3)}, {"token": "No", "logprob": math.log(0.6)}]
            return 200, {"choices": [{"message": {"content": "No"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}
        return 200, {"choices": [{"message": {"role": "assistant", "content": "Score: 7"}}]}

    with StubJudge(reply) as server:
        verdict = JudgeReward(server.url, api="chat", verdicts={"Yes": 1.0, "No": 0.0})
        score = JudgeReward(server.url, api="chat", mode="score")
        # 0.3 / (0.3 + 0.6) = 1/3
        assert verdict(prompts=["p"], completions=["c"]) == [pytest.approx(1 / 3)]
        assert score(prompts=["p", "q"], completions=["c", "d"]) == [7.0, 7.0]


@pytest.mark.parametrize(
    "body",
    [
        b"<html>bad gateway</html>",  # not JSON
        {"error": "oops"},  # no choices
        {"choices": [{"text": " Yes"}]},  # no logprobs although they were asked for
        {"choices": [{"text": " Yes", "logprobs": {"top_logprobs": []}}]},
    ],
)
def test_http_malformed_reply_is_none_or_a_clear_error(body):
    with StubJudge(lambda path, payload: (200, body)) as server:
        assert JudgeReward(server.url)(prompts=["p"], completions=["c"]) == [None]
        with pytest.raises(ValueError, match=f"Judge server {server.url}/completions sent"):
            JudgeReward(server.url, on_malformed="raise")(prompts=["p"], completions=["c"])


def test_http_client_error_is_not_retried_and_names_the_url():
    with StubJudge(lambda path, payload: (404, {"error": "model 'x' does not exist"})) as server:
        with pytest.raises(RuntimeError, match=r"refused the request: HTTP 404: .*model 'x' does not exist"):
            JudgeReward(server.url, max_retries=3, backoff=0.0)(prompts=["p"], completions=["c"])
    assert len(server.requests) == 1


def test_http_server_error_is_retried_with_backoff_then_succeeds():
    answers = iter([(503, {"error": "loading"}), (503, {"error": "loading"})])

    def reply(path, payload):
        return next(answers, None) or completions_reply(path, payload)

    with StubJudge(reply) as server:
        start = time.monotonic()
        got = JudgeReward(server.url, max_retries=2, backoff=0.1)(prompts=["p"], completions=["c"])
        elapsed = time.monotonic() - start
    assert got == [pytest.approx(0.75)]
    assert len(server.requests) == 3
    assert elapsed >= 0.1 + 0.2  # waits backoff, then 2 * backoff


def test_http_timeout_retries_then_raises():
    with StubJudge(completions_reply, delay=1.0) as server:
        reward = JudgeReward(server.url, timeout=0.2, max_retries=1, backoff=0.0)
        expected = rf"{server.url}/completions did not reply within timeout=0.2 s .*after 2 attempts"
        with pytest.raises(TimeoutError, match=expected):
            reward(prompts=["p"], completions=["c"])
        assert len(server.requests) == 2


def test_http_closed_port_names_the_url():
    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConnectionError, match=rf"Judge server {url}/completions is unreachable .*after 2 attempts"):
        JudgeReward(url, max_retries=1, backoff=0.0)(prompts=["p"], completions=["c"])


def test_trainer_trains_on_a_local_judge_reward(tiny_model_path, prompt_dataset, tmp_path):
    reward = JudgeReward(tiny_model_path, template=TEMPLATE, verdicts={"y": 1.0, "n": 0.0})
    args = make_config(trl_plus.GRPOConfig, tmp_path, max_steps=1)
    trainer = trl_plus.GRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    # Every reward is a probability strictly inside (0, 1), and none is missing.
    assert 0.0 < entry["rewards/judge_reward/mean"] < 1.0
    assert entry["judge/none_ratio"] == 0.0
