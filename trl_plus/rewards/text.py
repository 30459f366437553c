"""Text of prompts and completions that are strings or chat messages, shared by the reward callables."""

from typing import Any


def message_text(value: Any, roles: tuple[str, ...] | None = None) -> str:
    """A prompt or completion as text: a string as is; chat messages as their contents joined by newlines, only those
    of `roles` when given (a message without a role counts as the assistant's).

    >>> message_text([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    '2+2?\\n4'
    >>> message_text([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], ("assistant",))
    '4'
    """
    if isinstance(value, str):
        return value
    messages = [value] if isinstance(value, dict) else list(value)
    parts = []
    for message in messages:
        if roles is not None and message.get("role", "assistant") not in roles:
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # multimodal content parts: [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(str(content))
    return "\n".join(parts)
