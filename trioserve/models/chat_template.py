"""Turning chat messages and completion prompts into prompt tokens."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from trioserve.models.tool_prompt import inline_tools, needs_inline_tools, template_renders_tools


class PromptError(ValueError):
    """The messages cannot be rendered with this model's chat template."""


def chat_prompt_tokens(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Render ``messages`` with the model's chat template (or ``chat_template``, a Jinja
    template that overrides it), ready for the assistant's turn."""
    if chat_template is None and not getattr(tokenizer, "has_chat_template", False):
        # A base model: plain concatenation is the honest fallback.
        text = "\n".join(str(m.get("content") or "") for m in messages)
        return list(tokenizer.encode(text))
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if needs_inline_tools(messages, tools) and not template_renders_tools(template):
        messages, tools = inline_tools(messages, tools), None
    extra = {"chat_template": chat_template} if chat_template else {}
    try:
        tokens = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=True, **extra
        )
    except Exception as exc:  # jinja errors are the client's messages not fitting the template
        raise PromptError(f"the chat template rejected these messages: {exc}") from exc
    return list(tokens)


def completion_prompt_tokens(
    tokenizer: Any, prompt: str | list[int] | tuple[int, ...]
) -> list[int]:
    """A raw completion prompt: text is encoded as is; token ids are passed through."""
    if not isinstance(prompt, str):
        return list(prompt)
    return list(tokenizer.encode(prompt, add_special_tokens=False))


@lru_cache(maxsize=4)
def read_chat_template(path: Path) -> str:
    """The text of a ``--chat-template`` file (read once). Raises ``OSError``/``ValueError``."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"the chat template {path} is empty")
    return text
