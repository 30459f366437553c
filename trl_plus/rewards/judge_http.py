"""A minimal client for an OpenAI-compatible judge server (vLLM's `vllm serve`, or any server with that API).

Standard library only (`urllib`): one POST per judged text to `{base_url}/completions` or
`{base_url}/chat/completions`, with a timeout, retries with exponential backoff on transport failures (refused
connection, timeout, HTTP 408/429/5xx), and errors that name the URL. A reply that arrives but lacks the fields the
request asked for raises `JudgeReplyError`; `JudgeReward` decides whether that becomes None or an error.
"""

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

API_PATHS = {"completions": "/completions", "chat": "/chat/completions"}
_RETRIED_HTTP_CODES = {408, 429, 500, 502, 503, 504}


class JudgeReplyError(ValueError):
    """The judge server answered, but not with what was asked (not JSON, no choices, no logprobs, no text)."""


class OpenAICompatibleJudge:
    """Scores texts through an OpenAI-compatible server: first-token verdict log-probabilities, or a greedy reply.

    Args:
        base_url: the API root, as OpenAI clients take it, e.g. `http://127.0.0.1:8000/v1`.
        api: `completions` (the text is the prompt) or `chat` (the text is one user message).
        model: the served model's name, sent as `model` when given (vLLM accepts its served name).
        api_key: sent as `Authorization: Bearer <api_key>` when given.
        timeout: seconds to wait for one reply.
        max_retries: further attempts after a transport failure; the n-th waits `backoff * 2**n` seconds first.
        backoff: seconds before the first retry.
    """

    def __init__(
        self,
        base_url: str,
        api: str = "completions",
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff

    @property
    def url(self) -> str:
        return self.base_url + API_PATHS[self.api]

    def verdict_logprobs(self, text: str, verdicts: Sequence[str], top_logprobs: int) -> dict[str, float]:
        """Log-probability of each verdict found among the first reply token's `top_logprobs` alternatives.

        Tokens match a verdict when they are equal after stripping whitespace (`" Yes"` and `"Yes"` are both "Yes";
        their probabilities add). A verdict outside the top alternatives is absent from the result.
        """
        payload = {"max_tokens": 1, "temperature": 0.0}
        if self.api == "chat":
            payload.update(messages=[{"role": "user", "content": text}], logprobs=True, top_logprobs=top_logprobs)
        else:
            payload.update(prompt=text, logprobs=top_logprobs)
        reply = self._post(payload)
        try:
            logprobs = reply["choices"][0]["logprobs"]
            if self.api == "chat":
                alternatives = [(item["token"], item["logprob"]) for item in logprobs["content"][0]["top_logprobs"]]
            else:
                alternatives = list(logprobs["top_logprobs"][0].items())
            alternatives = [(str(token), float(logprob)) for token, logprob in alternatives]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            message = f"Judge server {self.url} sent no first-token top_logprobs: {_excerpt(reply)}"
            raise JudgeReplyError(message) from error
        found: dict[str, float] = {}
        for verdict in verdicts:
            matches = [logprob for token, logprob in alternatives if token.strip() == verdict.strip()]
            if matches:
                top = max(matches)
                found[verdict] = top + math.log(sum(math.exp(logprob - top) for logprob in matches))
        return found

    def generate(self, text: str, max_tokens: int) -> str:
        """The server's greedy reply to `text`, at most `max_tokens` tokens."""
        payload = {"max_tokens": max_tokens, "temperature": 0.0}
        if self.api == "chat":
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = text
        reply = self._post(payload)
        try:
            choice = reply["choices"][0]
            content = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError) as error:
            raise JudgeReplyError(f"Judge server {self.url} sent no reply text: {_excerpt(reply)}") from error
        if not isinstance(content, str):
            raise JudgeReplyError(f"Judge server {self.url} sent no reply text: {_excerpt(reply)}")
        return content

    def _post(self, payload: dict) -> dict:
        """POST `payload` as JSON and return the decoded reply, retrying transport failures with backoff."""
        if self.model is not None:
            payload = {"model": self.model, **payload}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode("utf-8")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                if error.code not in _RETRIED_HTTP_CODES:  # a bad request stays bad: no retry
                    message = f"Judge server {self.url} refused the request: HTTP {error.code}: {detail}"
                    raise RuntimeError(message) from error
                failure: Exception = RuntimeError(f"Judge server {self.url} answered HTTP {error.code}: {detail}")
            except TimeoutError as error:  # a read timeout (a connect timeout comes as a URLError)
                failure = TimeoutError(f"Judge server {self.url} did not reply within timeout={self.timeout} s")
                failure.__cause__ = error
            except urllib.error.URLError as error:
                if isinstance(error.reason, TimeoutError):
                    failure = TimeoutError(f"Judge server {self.url} did not reply within timeout={self.timeout} s")
                else:
                    failure = ConnectionError(
                        f"Judge server {self.url} is unreachable ({error.reason}); is it running and is the URL right?"
                    )
            except (ConnectionError, OSError) as error:  # e.g. the server closed the connection mid-reply
                failure = ConnectionError(f"Judge server {self.url} dropped the connection ({error})")
        else:
            raise type(failure)(f"{failure} (gave up after {attempts} attempts)") from failure
        try:
            reply = json.loads(body)
        except ValueError as error:
            raise JudgeReplyError(f"Judge server {self.url} sent a reply that is not JSON: {body[:200]!r}") from error
        if not isinstance(reply, dict):
            raise JudgeReplyError(f"Judge server {self.url} sent a reply that is not a JSON object: {_excerpt(reply)}")
        return reply

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"


def _excerpt(reply) -> str:
    text = json.dumps(reply) if not isinstance(reply, str) else reply
    return text if len(text) <= 200 else text[:200] + "..."
