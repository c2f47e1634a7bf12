"""The prompt contract of image-conditioned generation (RecA, Xie et al., 2025, arXiv 2509.07295).

Generation is conditioned on an image by putting the model's own understanding embeddings of it where a
text→image prompt holds its caption: ``generation_prefix + <image placeholders>``, optionally followed by a newline
and a text instruction, inside the chat template. The reconstruction training task
(:meth:`harmon.model.HarmonModel.reconstruction_loss`, the ``reconstruction`` task of :mod:`harmon.training`) and
image-conditioned sampling (``HarmonPipeline(image=...)``) build their prompts with this one function, so training
and inference see the same text.
"""

from __future__ import annotations


def image_generation_input(generation_prefix: str, image_placeholders: str, instruction: str | None = None) -> str:
    """The ``{input}`` of the chat template for generation from an image: ``generation_prefix`` (the model's
    ``"Generate an image: "``), the image placeholder(s), then ``"\\n" + instruction`` when one is given."""
    text = generation_prefix + image_placeholders
    if instruction is not None and instruction.strip():
        text += "\n" + instruction.strip()
    return text


__all__ = ["image_generation_input"]
