"""Argument checks at the library's edge, as small functions that name the argument they check.

Each check either returns the (normalised) value or raises ``TypeError`` (wrong type) / ``ValueError`` (wrong
value) whose message starts with the argument's name. They run before any work, so a refused call changes
nothing (no tokenizing, no random draw, no cache). Written by hand: pydantic validates models, not the keyword
arguments of a ``__call__`` one by one with these messages, and torch/diffusers check nothing of this.

Documented limits (work that would otherwise hang or exhaust memory is refused up front):

* :data:`MAX_IMAGES_PER_CALL` images per pipeline call (prompts × ``num_images_per_prompt``) or per
  ``understand`` call — larger batches are a loop over calls;
* :data:`MAX_PROMPT_CHARACTERS` characters per prompt / question / negative prompt (any LLM context is far
  shorter; the exact token count is checked against the context after tokenizing).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MAX_IMAGES_PER_CALL = 256
MAX_PROMPT_CHARACTERS = 100_000
MAX_SEED = 2**64 - 1


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """A finite real number (not a bool, not a string) within the bounds → ``float(value)``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if minimum is not None and (number <= minimum if exclusive_minimum else number < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or numpy; not a bool, not a float) within the bounds → ``int(value)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_type_name(value)} {value!r}")
    return bool(value)


def check_seed(name: str, seed: Any) -> int | None:
    """``None`` or an int in ``[0, 2**64 - 1]`` (what ``torch.manual_seed`` takes)."""
    return None if seed is None else check_int(name, seed, minimum=0, maximum=MAX_SEED)


def check_callback(name: str, callback: Any) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"{name} must be callable (or None), got {_type_name(callback)} {callback!r}")


def check_generator(name: str, generator: Any, count: int) -> None:
    """``None``, a ``torch.Generator`` or a list/tuple of exactly ``count`` of them."""
    hint = " (to seed, pass torch.Generator().manual_seed(seed))"
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)):
        raise TypeError(f"{name} must be a torch.Generator or a list of them, got {_type_name(generator)}{hint}")
    bad = [i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)]
    if bad:
        raise TypeError(f"{name}[{bad[0]}] must be a torch.Generator, got {_type_name(generator[bad[0]])}{hint}")
    if len(generator) != count:
        raise ValueError(f"{name}: got a list of {len(generator)} generators for {count} images")


def check_text(name: str, text: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {_type_name(text)}")
    if not allow_empty and not text.strip():
        raise ValueError(f"{name} is empty")
    if len(text) > MAX_PROMPT_CHARACTERS:
        raise ValueError(f"{name} has {len(text)} characters, more than the limit of {MAX_PROMPT_CHARACTERS}")
    return text


def check_texts(name: str, texts: Any) -> list[str]:
    """A string or a non-empty list/tuple of non-empty strings → a list."""
    if texts is None:
        raise ValueError(f"{name}: give a string or a non-empty list of strings, got None")
    if isinstance(texts, str):
        return [check_text(name, texts)]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {_type_name(texts)}")
    if not texts:
        raise ValueError(f"{name}: the list is empty")
    return [check_text(f"{name}[{i}]", text) for i, text in enumerate(texts)]


def check_batch(name: str, count: int, limit: int = MAX_IMAGES_PER_CALL) -> None:
    """Refuse ``count`` images in one call above the documented ``limit`` (before any tokenizing)."""
    if count > limit:
        raise ValueError(
            f"{name}: {count} images in one call exceed the limit of {limit} (harmon.validation.MAX_IMAGES_PER_CALL); "
            "split the work over several calls"
        )


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_finite_array(name: str, array: np.ndarray | torch.Tensor) -> None:
    """Refuse NaN / inf values in an image array or tensor."""
    finite = torch.isfinite(array).all() if isinstance(array, torch.Tensor) else np.isfinite(array).all()
    if not bool(finite):
        raise ValueError(f"{name}: the image holds NaN or infinite values")


def check_generation_arguments(
    *,
    prompt: Any,
    guidance_scale: Any,
    temperature: Any,
    num_images_per_prompt: Any,
    num_inference_steps: Any,
    generator: Any,
    callback_on_step_end: Any,
    negative_prompt: Any,
    prompt_input_ids: Any = None,
    num_conditioning_images: int | None = None,
) -> None:
    """The prompts, numbers, generators and callback of ``HarmonPipeline.__call__`` (types, finiteness, limits).
    With ready ``prompt_input_ids`` rows (``[cond; uncond]`` when guided) instead of ``prompt``, their count; when
    generating from ``num_conditioning_images`` images, one image per prompt (``prompt`` holds optional
    instructions, checked by the pipeline)."""
    guidance = check_number("guidance_scale", guidance_scale, minimum=1)
    if num_conditioning_images is not None:
        num_prompts = num_conditioning_images
    elif prompt is None and prompt_input_ids is not None:
        num_prompts = len(prompt_input_ids) // (2 if guidance > 1 else 1)
    else:
        num_prompts = len(check_texts("prompt", prompt))
    check_number("temperature", temperature, minimum=0, exclusive_minimum=True)
    per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1, maximum=MAX_IMAGES_PER_CALL)
    if num_inference_steps is not None:  # None: the pipeline's default, min(64, m·n)
        check_int("num_inference_steps", num_inference_steps, minimum=1)
    check_batch("num_images_per_prompt", num_prompts * per_prompt)
    check_generator("generator", generator, num_prompts * per_prompt)
    check_callback("callback_on_step_end", callback_on_step_end)
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
    if isinstance(negatives, (list, tuple)):  # one for all or one per prompt; "" means the default
        for i, text in enumerate(negatives):
            check_text("negative_prompt" if isinstance(negative_prompt, str) else f"negative_prompt[{i}]", text,
                       allow_empty=True)
    elif negative_prompt is not None:
        raise TypeError(f"negative_prompt must be a string or a list of strings, got {_type_name(negative_prompt)}")


def check_understanding_arguments(
    *,
    image: Any,
    question: Any,
    max_new_tokens: Any,
    do_sample: Any,
    temperature: Any,
    top_p: Any,
    seed: Any,
    min_new_tokens: Any,
    skip_special_tokens: Any,
) -> None:
    """The arguments of ``HarmonPipeline.understand`` besides the images and questions."""
    questions = check_texts("question", question)
    num_images = len(image) if isinstance(image, (list, tuple)) else 1
    if num_images != len(questions):
        raise ValueError(f"image: got {num_images} images for {len(questions)} questions")
    check_batch("image", num_images)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    if check_bool("do_sample", do_sample):
        check_number("temperature", temperature, minimum=0, exclusive_minimum=True)
        if top_p is not None:
            check_number("top_p", top_p, minimum=0, maximum=1, exclusive_minimum=True)
    check_seed("seed", seed)
    if min_new_tokens is not None:
        check_int("min_new_tokens", min_new_tokens, minimum=0, maximum=int(max_new_tokens))
    check_bool("skip_special_tokens", skip_special_tokens)


__all__ = [
    "MAX_IMAGES_PER_CALL",
    "MAX_PROMPT_CHARACTERS",
    "check_batch",
    "check_bool",
    "check_callback",
    "check_choice",
    "check_finite_array",
    "check_generation_arguments",
    "check_generator",
    "check_int",
    "check_number",
    "check_seed",
    "check_text",
    "check_texts",
    "check_understanding_arguments",
]
