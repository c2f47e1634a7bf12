"""``HarmonProcessor``: the prompt contract of a Harmon model in one object (transformers' ``ProcessorMixin``).

It owns what the pipeline (generation and understanding), the training collator and the experiments all need:

* the tokenizer (its ``save_pretrained`` folder is the processor's);
* the chat template pieces (the original's Qwen ``INSTRUCTION`` with its ``{input}`` field), the generation prefix
  (``"Generate an image: "``) and the unconditional prompt (``"Generate an image."``);
* the image placeholder token (``<image>``) and its expansion to as many tokens as the understanding path makes;
* the stop ids (``<|im_end|>`` and ``<|endoftext|>``) as a transformers ``GenerationConfig``;
* image preparation for understanding (EXIF orientation applied, gray pad-to-square, bicubic resize, [-1, 1]),
  done here once.

User text (prompts, questions, captions, answers) is always tokenized as *text*: a ``<|im_end|>``,
``<|im_start|>`` or ``<image>`` typed by a user stays those characters and never becomes a control token — only the
template's own pieces and the expanded placeholder are special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, ProcessorMixin

from harmon.pipelines.image_processing import ImageInput, preprocess_for_understanding

IMAGE_TOKEN = "<image>"
DEFAULT_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"


class HarmonProcessor(ProcessorMixin):
    """Tokenizer + chat template + image placeholder + stop ids + understanding image preparation.

    Args:
        tokenizer: the LLM's tokenizer; an ``<image>`` token is added when it has none.
        instruction: the chat template of one user turn, with an ``{input}`` field.
        generation_prefix: put before a text-to-image prompt inside the turn.
        unconditional_prompt: the unconditional (classifier-free guidance) prompt.
        image_token: the placeholder token the visual embeddings replace.
        image_size: the default square side of understanding images.
    """

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        instruction: str = DEFAULT_INSTRUCTION,
        generation_prefix: str = "Generate an image: ",
        unconditional_prompt: str = "Generate an image.",
        image_token: str = IMAGE_TOKEN,
        image_size: int = 256,
        chat_template: str | None = None,
        **kwargs,
    ) -> None:
        if tokenizer is None:
            raise ValueError("tokenizer: HarmonProcessor needs the LLM's tokenizer")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: it has no EOS token (Qwen's <|im_end|> is expected)")
        if "{input}" not in instruction:
            raise ValueError(f"instruction: the chat template has no {{input}} field: {instruction!r}")
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_id is None or image_id == tokenizer.unk_token_id:
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        self.instruction = instruction
        self.generation_prefix = generation_prefix
        self.unconditional_prompt = unconditional_prompt
        self.image_token = image_token
        self.image_size = int(image_size)
        super().__init__(tokenizer, chat_template=chat_template or getattr(tokenizer, "chat_template", None))

    @classmethod
    def from_config(cls, tokenizer, config, image_size: int | None = None) -> "HarmonProcessor":
        """The processor of a :class:`~harmon.configs.HarmonConfig` (its template, prefix, unconditional prompt)."""
        return cls(
            tokenizer,
            instruction=config.prompt_template.instruction,
            generation_prefix=config.generation_prefix,
            unconditional_prompt=config.unconditional_prompt,
            image_size=image_size or config.image_size,
        )

    # ------------------------------------------------------------------------------------------ token ids
    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS (``<|im_end|>``) plus ``<|endoftext|>`` when the vocabulary has it: the original's stop words."""
        tokenizer = self.tokenizer
        ids = [tokenizer.eos_token_id]
        end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(end_of_text, int) and end_of_text != tokenizer.unk_token_id and end_of_text not in ids:
            ids.append(end_of_text)
        return ids

    @property
    def generation_config(self) -> GenerationConfig:
        """Greedy decoding that stops at :attr:`stop_token_ids` (the understanding defaults)."""
        return GenerationConfig(eos_token_id=self.stop_token_ids, pad_token_id=self.pad_token_id, do_sample=False)

    def text_ids(self, text: str) -> list[int]:
        """``text`` as plain text: special-token strings in it are split into ordinary tokens."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def template_ids(self, text: str) -> list[int]:
        """A template piece (written by the library, not a user): its special tokens are special tokens."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def user_turn(self, text: str, image_tokens: int = 0) -> list[int]:
        """One chat turn ``instruction.format(input=...)`` as ids: ``image_tokens`` placeholders and a newline
        first when given (the original's ``"<image>\\n" + question``), then ``text`` as text."""
        head, tail = self.instruction.split("{input}", 1)
        ids = self.template_ids(head)
        if image_tokens:
            ids += [self.image_token_id] * int(image_tokens) + self.template_ids("\n")
        return ids + self.text_ids(text) + self.template_ids(tail)

    def generation_prompt(self, prompt: str) -> list[int]:
        """The text-to-image prompt's ids (an empty prompt: the unconditional prompt)."""
        prompt = prompt.strip()
        if not prompt:
            return self.user_turn(self.unconditional_prompt)
        return self.user_turn(self.generation_prefix + prompt)

    # ------------------------------------------------------------------------------------------ batches
    @staticmethod
    def pad(rows: Sequence[list[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of id rows padded with ``value`` on ``side``."""
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), value, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    def generation_inputs(
        self,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt rows ``[cond…; uncond…]`` for the sampler, right-padded with EOS (as the original pads them).

        Each prompt's row is repeated ``num_images_per_prompt`` times; with ``guidance`` the unconditional rows
        follow: ``negative_prompt`` (one for all, or one per prompt) or the unconditional prompt."""
        rows = [self.user_turn(self.generation_prefix + p) for p in prompts for _ in range(num_images_per_prompt)]
        if guidance:
            rows += self.unconditional_rows(negative_prompt, len(prompts), num_images_per_prompt)
        return self.pad(rows, self.tokenizer.eos_token_id, side="right")

    def unconditional_rows(
        self, negative_prompt: str | Sequence[str | None] | None, count: int, num_images_per_prompt: int = 1
    ) -> list[list[int]]:
        """The unconditional (guidance) rows for ``count`` conditional prompts, each repeated
        ``num_images_per_prompt`` times: ``negative_prompt`` (one for all, or one per prompt; empty or ``None``
        entries fall back) or the unconditional prompt."""
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or self.unconditional_prompt] * count
        else:
            negatives = [n or self.unconditional_prompt for n in negative_prompt]
        return [self.user_turn(n) for n in negatives for _ in range(num_images_per_prompt)]

    def understanding_inputs(
        self, questions: Sequence[str], image_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Question rows, each ``image_tokens`` placeholders + ``"\\n"`` + the question in a user turn, left-padded
        (so that every answer starts right after its prompt)."""
        rows = [self.user_turn(q, image_tokens=image_tokens) for q in questions]
        return self.pad(rows, self.pad_token_id, side="left")

    def preprocess_images(self, images: Sequence[ImageInput], image_size: int | None = None) -> torch.Tensor:
        """Understanding pixels ``(B, 3, S, S)`` in [-1, 1]: EXIF orientation, gray pad-to-square, bicubic resize."""
        return preprocess_for_understanding(list(images), int(image_size or self.image_size))

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)


__all__ = ["IMAGE_TOKEN", "HarmonProcessor"]
