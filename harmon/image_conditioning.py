"""The prompt contract of image-conditioned generation (RecA, Xie et al., 2025, arXiv 2509.07295).

Generation is conditioned on an image by putting the model's own understanding embeddings of it where a
text→image prompt holds its caption: ``generation_prefix + <image placeholders>``, optionally followed by a newline
and a text instruction, inside the chat template. The reconstruction training task
(:meth:`harmon.model.HarmonModel.reconstruction_loss`, the ``reconstruction`` task of :mod:`harmon.training`) and
image-conditioned sampling (``HarmonPipeline(image=...)``, :func:`image_generation_rows`) build their prompts on
this one function, so training and inference see the same text; :func:`image_prompt_embeddings` and
:func:`prefill_embeddings` give the sampler the embedded prompt rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def image_generation_input(generation_prefix: str, image_placeholders: str, instruction: str | None = None) -> str:
    """The ``{input}`` of the chat template for generation from an image: ``generation_prefix`` (the model's
    ``"Generate an image: "``), the image placeholder(s), then ``"\\n" + instruction`` when one is given."""
    text = generation_prefix + image_placeholders
    if instruction is not None and instruction.strip():
        text += "\n" + instruction.strip()
    return text


def image_generation_ids(processor, image_tokens: int, instruction: str | None = None) -> list[int]:
    """One conditional prompt for generation from an image, as ids: a user turn of ``generation_prefix``,
    ``image_tokens`` placeholders and, when ``instruction`` is given, a newline and the instruction (text, never
    control tokens) — the token form of :func:`image_generation_input`. ``processor``: a
    :class:`~harmon.pipelines.HarmonProcessor`; the RecA collator builds its training prompt with it too."""
    head, tail = processor.instruction.split("{input}", 1)
    ids = processor.template_ids(head) + processor.text_ids(processor.generation_prefix)
    ids += [processor.image_token_id] * int(image_tokens)
    if instruction is not None and instruction.strip():
        ids += processor.text_ids("\n" + instruction.strip())
    return ids + processor.template_ids(tail)


def image_generation_rows(
    processor,
    instructions: Sequence[str | None],
    image_tokens: int,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    guidance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt rows ``[cond…; uncond…]`` for generation from images, right-padded with EOS (as text → image).

    A conditional row is one user turn of ``generation_prefix``, ``image_tokens`` placeholders and, when the
    image's instruction is not ``None``, a newline and the instruction (text, never control tokens) — the token
    form of :func:`image_generation_input`; each is repeated ``num_images_per_prompt`` times. With ``guidance`` the
    unconditional rows follow: ``negative_prompt`` (one for all, or one per image) or the processor's
    unconditional prompt, without the image. ``processor`` is a :class:`~harmon.pipelines.HarmonProcessor`."""
    rows = []
    for instruction in instructions:
        rows += [image_generation_ids(processor, image_tokens, instruction)] * num_images_per_prompt
    if guidance:
        rows += processor.unconditional_rows(negative_prompt, len(instructions), num_images_per_prompt)
    return processor.pad(rows, processor.tokenizer.eos_token_id, side="right")


def image_prompt_embeddings(
    llm, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int, conditional_rows: int
) -> torch.Tensor:
    """The LLM input embeddings of :func:`image_generation_rows`: the first ``conditional_rows`` rows with the
    rows of ``image_embeds (conditional_rows, N, H)`` at their placeholders, the other (unconditional) rows as
    text."""
    from harmon.core import embed_text, splice_image_embeddings

    cond = splice_image_embeddings(llm, input_ids[:conditional_rows], image_embeds, image_token_id)
    if conditional_rows == input_ids.shape[0]:
        return cond
    return torch.cat([cond, embed_text(llm, input_ids[conditional_rows:]).to(cond.dtype)])


def prefill_embeddings(llm, inputs_embeds: torch.Tensor):
    """KV cache of prompt rows given as embeddings (:func:`harmon.core.prefill` for ids): attends to the right
    padding as that does (harmless: it follows every real token; later steps mask it out)."""
    from transformers import DynamicCache

    from harmon.core import llm_hidden_states

    cache = DynamicCache()
    llm_hidden_states(llm, inputs_embeds, cache=cache)
    return cache


__all__ = ["image_generation_input", "image_generation_rows", "image_prompt_embeddings", "prefill_embeddings"]
