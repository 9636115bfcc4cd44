"""Turning chat messages and completion prompts into prompt tokens."""

from __future__ import annotations

from typing import Any


class PromptError(ValueError):
    """The messages cannot be rendered with this model's chat template."""


def chat_prompt_tokens(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict] | None = None
) -> list[int]:
    """Render ``messages`` with the model's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "has_chat_template", False):
        # A base model: plain concatenation is the honest fallback.
        text = "\n".join(str(m.get("content") or "") for m in messages)
        return list(tokenizer.encode(text))
    try:
        tokens = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=True
        )
    except Exception as exc:  # jinja errors are the client's messages not fitting the template
        raise PromptError(f"the chat template rejected these messages: {exc}") from exc
    return list(tokens)


def completion_prompt_tokens(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """A raw completion prompt: text is encoded as is; token ids are passed through."""
    if isinstance(prompt, list):
        return list(prompt)
    return list(tokenizer.encode(prompt, add_special_tokens=False))
