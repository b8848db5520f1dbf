"""Turning an input row into a prompt: template, system prompt, chat template, token ids."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any


class RowError(ValueError):
    """Something wrong with one row; it goes to the row's ``error`` column."""


@dataclass
class PromptBuilder:
    """:param prompt_column: string column with the user prompt (or ``None`` with a template).
    :param messages_column: list of ``{role, content}`` structs, used instead of ``prompt_column``.
    :param system_prompt: applied to every row that has no system message of its own.
    :param prompt_template: Jinja over the row's columns, e.g. ``"Summarise: {{ row.text }}"``.
    """

    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None

    @cached_property
    def template(self):
        if not self.prompt_template:
            return None
        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment

        return SandboxedEnvironment(undefined=StrictUndefined).from_string(self.prompt_template)

    def input_columns(self) -> list[str]:
        """Columns the input must have (a template may read any column: checked per row)."""
        if self.messages_column:
            return [self.messages_column]
        if self.template is not None:
            return []
        return [self.prompt_column] if self.prompt_column else []

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        if self.messages_column:
            raw = row.get(self.messages_column)
            if raw is None or len(raw) == 0:
                raise RowError(f"{self.messages_column} is null or empty")
            messages = []
            for m in raw:
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role"):
                    raise RowError(f"{self.messages_column} holds an entry without role and content")
                messages.append({"role": str(m["role"]), "content": m["content"]})
        else:
            if self.template is not None:
                try:
                    text = self.template.render(row=row)
                except Exception as exc:  # jinja errors: undefined column, bad filter, ...
                    raise RowError(f"prompt_template failed: {exc}") from None
            else:
                text = row.get(self.prompt_column)
                if text is None:
                    raise RowError(f"{self.prompt_column} is null")
                if not isinstance(text, str):
                    raise RowError(f"{self.prompt_column} is not a string")
            if not text.strip():
                raise RowError("prompt is empty")
            messages = [{"role": "user", "content": text}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


def checked_text(messages: list[dict[str, str]]) -> str:
    """What the prompt safety check reads: everything but the operator's own system prompt."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def encode(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the formatted prompt, ready for generation."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
            ids = ids["input_ids"]
        return list(ids)
    # A base model without a chat template: plain text, roles as simple prefixes.
    if len(messages) == 1:
        text = messages[0]["content"]
    else:
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
    return tokenizer(text)["input_ids"]


def context_limit(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)
