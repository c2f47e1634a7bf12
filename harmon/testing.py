"""Tiny, offline building blocks for tests, examples and smoke runs (no hub access).

``prompt_rows()`` lays prompt ids out as the sampler takes them and ``generate_tokens()`` runs the pipeline's
loop on them; ``tiny_tokenizer()`` builds a character-level BPE tokenizer with the Qwen chat special tokens
(``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, ``<image>`` = 3) that fits the ``tiny``
preset's 256-token vocabulary; ``tiny_model()`` a randomly initialised ``tiny`` HarmonModel.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A ~100-token character-level tokenizer with Qwen's chat special tokens and chat template."""
    characters = ["\n", *(chr(c) for c in range(32, 127))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *characters])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_model(seed: int = 0, sane_head: bool = True, understanding_encoder=None):
    """A randomly initialised ``tiny`` :class:`~harmon.model.HarmonModel` in eval mode.

    MAR initialises the head's output layers at zero, which makes a random head predict ε = 0; with
    ``sane_head`` those layers get small random values so that samples depend on the prompt.
    ``understanding_encoder`` (a registered name or a :class:`~harmon.configs.ComponentSpec`) makes it decoupled.
    """
    from harmon.configs import ComponentSpec, HarmonConfig
    from harmon.model import HarmonModel

    torch.manual_seed(seed)
    overrides = {}
    if understanding_encoder is not None:
        if isinstance(understanding_encoder, str):
            understanding_encoder = ComponentSpec(name=understanding_encoder)
        overrides["understanding_encoder"] = understanding_encoder
    model = HarmonModel.from_config(HarmonConfig.from_preset("tiny", **overrides))
    if sane_head:
        with torch.no_grad():
            for parameter in model.head.parameters():
                if parameter.abs().sum() == 0:
                    parameter.normal_(std=0.05)
    return model.eval()


def tiny_pipeline(seed: int = 0):
    """A :class:`~harmon.pipelines.HarmonPipeline` over :func:`tiny_model` and :func:`tiny_tokenizer`, progress bar
    off."""
    from harmon.pipelines import HarmonPipeline

    pipe = HarmonPipeline.from_model(tiny_model(seed), tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    image_shape: tuple[int, int],
    num_steps: int,
    guidance_scale: float = 3.0,
    tokenizer=None,
    pipeline=None,
    **kwargs,
) -> torch.Tensor:
    """The pipeline's sampling loop on ready prompt rows of ``model`` (a :class:`~harmon.model.HarmonModel`):
    tokens ``(B, m, n, C)``. ``kwargs`` go to :meth:`HarmonPipeline.__call__` (``generator``, ``random_source``,
    ``guidance_schedule``, ``temperature``, ``sampler``, ``head_steps``, ``compile_head``, ...); ``pipeline``: a
    ready pipeline over ``model`` (else one is built, with ``tokenizer`` or the tiny one)."""
    from harmon.latents import latents_to_tokens
    from harmon.pipelines import HarmonPipeline

    pipe = pipeline
    if pipe is None:
        pipe = HarmonPipeline.from_model(model, tokenizer if tokenizer is not None else tiny_tokenizer())
        pipe.set_progress_bar_config(disable=True)
    stride = model.config.latent_stride
    m, n = image_shape
    latents = pipe(
        prompt_input_ids=input_ids, prompt_attention_mask=attention_mask, height=m * stride, width=n * stride,
        num_inference_steps=num_steps, guidance_scale=guidance_scale, output_type="latent", **kwargs,
    ).images
    return latents_to_tokens(latents, model.config.patch_size)


__all__ = ["SPECIAL_TOKENS", "generate_tokens", "prompt_rows", "tiny_model", "tiny_pipeline", "tiny_tokenizer"]


def prompt_rows(
    cond: list[list[int]], uncond: list[int] | None, pad_id: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt id lists → right-padded ``(input_ids, attention_mask)`` rows as :meth:`HarmonPipeline.__call__`
    takes them (``prompt_input_ids``): the ``cond`` rows, then (``uncond`` given, i.e. with guidance) one ``uncond`` row per cond row."""
    rows = cond + ([uncond] * len(cond) if uncond is not None else [])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask
