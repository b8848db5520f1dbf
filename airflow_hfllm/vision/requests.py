"""A vision row as a generation request: the chat text with one image placeholder per image, and its
ids with each placeholder expanded to its image's tokens (known from the probed sizes before any
pixel is decoded, so batching and the too-long check see the real length)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from airflow_hfllm.engine.generate import Request
from airflow_hfllm.vision.images import ProbedImage
from airflow_hfllm.vision.processor import LoadedProcessor


@dataclass
class VisionRequest(Request):
    """A row ready to generate: ``input_ids`` are the prompt's ids with each image placeholder expanded
    to its image's tokens (what the processor will produce: its length drives batching and the
    too-long check); ``text`` and ``images`` are what the processor gets; ``text_ids`` are the ids of
    ``text``, one placeholder per image (the fast engine expands them by the processor's grids)."""

    text: str = ""
    images: list[ProbedImage] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)


def expand_placeholders(ids: list[int], token: int, counts: Sequence[int]) -> list[int]:
    """``ids`` with the k-th ``token`` repeated ``counts[k]`` times; ValueError when the numbers differ."""
    positions = [n for n, t in enumerate(ids) if t == token]
    if len(positions) != len(counts):
        raise ValueError(f"the prompt has {len(positions)} image placeholders for {len(counts)} images")
    expanded: list[int] = []
    start = 0
    for position, count in zip(positions, counts):
        expanded += ids[start:position] + [token] * count
        start = position + 1
    return expanded + ids[start:]


def chat_text(processor: LoadedProcessor, messages: list[dict[str, Any]], n_images: int) -> str:
    """The formatted prompt: the user turn holds ``n_images`` image placeholders, then the text."""
    first_user = next((n for n, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("a vision prompt needs a user message")
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    chat[first_user]["content"] = [{"type": "image"} for _ in range(n_images)] + [
        {"type": "text", "text": messages[first_user]["content"]}]
    owner = processor.processor if getattr(processor.processor, "chat_template", None) else processor.tokenizer
    if getattr(owner, "chat_template", None):
        text = owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if isinstance(text, list):
            text = text[0]
        return text
    # No chat template: the vision placeholders then the text, roles as plain prefixes.
    image = "<|vision_start|>" + getattr(processor.processor, "image_token", "<|image_pad|>") + "<|vision_end|>"
    parts = [f"{m['role']}: {m['content']}" if m["role"] != "user" else image * n_images + m["content"]
             for m in messages]
    return "\n\n".join(parts)


def build_request(processor: LoadedProcessor, messages: list[dict[str, Any]], images: Sequence[ProbedImage],
                  max_new_tokens: int) -> VisionRequest:
    text = chat_text(processor, messages, len(images))
    ids = list(processor.tokenizer(text)["input_ids"])
    expanded = expand_placeholders(ids, processor.image_token_id, [image.tokens for image in images])
    return VisionRequest(expanded, max_new_tokens, text=text, images=list(images), text_ids=ids)
