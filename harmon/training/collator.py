"""Batches of one task: chat prompts, the image placeholder expanded, answer-only labels, right padding.

* text → image: ``instruction.format(input=generation_prefix + caption)``; with probability ``cfg_drop_prob`` the
  caption is dropped (empty), and the prompt becomes the model's ``unconditional_prompt`` — exactly the prompt the
  sampler's unconditional rows use. The decision is seeded by ``(seed, draw)``, so it does not depend on workers
  or on a resume.
* image → text: per turn ``instruction.format(input=question)`` then ``answer + "<|im_end|>"``, turns separated by
  the template's ``sep``; the first question is ``"<image>\\n" + question`` and the single ``<image>`` token is
  expanded to the encoder's ``m·n + buffer_size`` tokens. Labels hold the answer tokens (and their
  ``<|im_end|>``), -100 elsewhere.
* text: the document's tokens and an end-of-text token; every real token is a label.
* reconstruction (RecA): ``instruction.format(input=generation_prefix + "<image>" [+ "\n" + instruction])``
  (:func:`harmon.image_conditioning.image_generation_ids`) with ``<image>`` expanded as for image → text; the
  same prompt for every sample, never dropped; no labels (the loss is the diffusion loss on the image's tokens).

Prompts are built by :class:`~harmon.pipelines.HarmonProcessor` (the same object the pipeline uses): captions,
questions, answers and documents are tokenized as text, so a ``<|im_end|>`` or ``<image>`` inside them never becomes
a control token.

Written by hand: transformers' collators (``DataCollatorForSeq2Seq``, ``DataCollatorWithPadding``) pad, but none
builds Harmon's prompts, expands the image placeholder or drops captions; padding is three lines here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from harmon.configs import PromptTemplate
from harmon.image_conditioning import image_generation_ids

IGNORE_INDEX = -100
_DROP_TAG = 0xCF6


class HarmonCollator:
    def __init__(
        self,
        tokenizer,
        *,
        image_token_id: int,
        image_tokens: int,
        prompt_template: PromptTemplate,
        generation_prefix: str,
        unconditional_prompt: str,
        max_length: int = 1024,
        max_prompt_length: int = 128,
        cfg_drop_prob: float = 0.1,
        seed: int = 0,
        image_token: str = "<image>",
        reconstruction_instruction: str = "",
    ) -> None:
        from harmon.pipelines.processing_harmon import HarmonProcessor

        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.image_tokens = int(image_tokens)
        self.template = prompt_template
        if "{input}" not in prompt_template.instruction:
            raise ValueError("the prompt template's instruction has no {input} field")
        self.processor = HarmonProcessor(
            tokenizer, instruction=prompt_template.instruction, generation_prefix=generation_prefix,
            unconditional_prompt=unconditional_prompt, image_token=image_token,
        )
        self.generation_prefix = generation_prefix
        self.unconditional_prompt = unconditional_prompt
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.cfg_drop_prob, self.seed = cfg_drop_prob, int(seed)
        self.image_token = image_token
        self.reconstruction_instruction = reconstruction_instruction
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.processor.image_token_id != self.image_token_id:
            raise ValueError(
                f"image_token_id {self.image_token_id} is not the tokenizer's id of {image_token!r} "
                f"({self.processor.image_token_id})"
            )
        self.suffix_ids = self.processor.template_ids(prompt_template.suffix)
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.end_of_text_id = eot if isinstance(eot, int) and eot != tokenizer.unk_token_id else tokenizer.eos_token_id
        if self.image_tokens > max_length:
            raise ValueError(
                f"data.max_length ({max_length}) is below the {self.image_tokens} tokens of one image"
            )

    def encode(self, text: str) -> list[int]:
        """``text`` as text (special-token strings in it stay ordinary tokens)."""
        return self.processor.text_ids(text)

    # ------------------------------------------------------------------------------------------ text → image
    def caption_dropped(self, draw: int) -> bool:
        if self.cfg_drop_prob <= 0:
            return False
        return bool(np.random.default_rng((self.seed, _DROP_TAG, int(draw))).random() < self.cfg_drop_prob)

    def generation_prompt(self, caption: str) -> list[int]:
        """Token ids of the text-to-image prompt (an empty caption gives the unconditional prompt)."""
        caption = caption.strip()
        ids = self.processor.generation_prompt(caption)
        if not caption or len(ids) <= self.max_prompt_length:
            return ids
        # cut the caption (never the template) until the prompt fits
        overflow = len(ids) - self.max_prompt_length
        caption_ids = self.encode(caption)
        while overflow > 0 and caption_ids:
            caption_ids = caption_ids[: max(0, len(caption_ids) - overflow)]
            text = self.tokenizer.decode(caption_ids).strip()
            ids = self.processor.user_turn(self.generation_prefix + text)
            overflow = len(ids) - self.max_prompt_length
        if overflow > 0:
            raise ValueError(f"data.max_prompt_length ({self.max_prompt_length}) cannot hold the prompt template")
        return ids

    # ------------------------------------------------------------------------------------------ image → text
    def conversation(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation about one image (placeholder expanded)."""
        ids: list[int] = []
        labels: list[int] = []
        sep_ids = self.processor.template_ids(self.template.sep)
        for i, (question, answer) in enumerate(turns):
            prompt_ids = (sep_ids if i else []) + self.processor.user_turn(
                question, image_tokens=self.image_tokens if i == 0 else 0
            )
            answer_ids = self.encode(answer) + self.suffix_ids
            room = self.max_length - len(ids) - len(prompt_ids)
            if room <= 0:
                if i == 0:
                    raise ValueError(
                        f"data.max_length ({self.max_length}) cannot hold the image and the first question"
                    )
                break
            if len(answer_ids) > room:
                answer_ids = answer_ids[:room]
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            if len(ids) >= self.max_length:
                break
        return ids, labels

    # ---------------------------------------------------------------------------------------- reconstruction
    def reconstruction_prompt(self) -> list[int]:
        """Token ids of the reconstruction prompt, the image placeholder expanded to the image's tokens (the
        pipeline's image-conditioned prompt, :func:`harmon.image_conditioning.image_generation_ids`)."""
        ids = image_generation_ids(self.processor, self.image_tokens, self.reconstruction_instruction)
        if len(ids) > self.max_length:
            raise ValueError(
                f"data.max_length ({self.max_length}) cannot hold the reconstruction prompt ({len(ids)} tokens, "
                "the image's included)"
            )
        return ids

    # --------------------------------------------------------------------------------------------------- text
    def document(self, text: str) -> list[int]:
        return (self.encode(text) + [self.end_of_text_id])[: self.max_length]

    # ------------------------------------------------------------------------------------------------ batching
    def pad(self, rows: Sequence[list[int]], value: int) -> torch.Tensor:
        length = max(len(row) for row in rows)
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        tasks = {sample["task"] for sample in samples}
        if len(tasks) != 1:
            raise ValueError(f"a micro-batch holds one task, got {sorted(tasks)}")
        task = tasks.pop()
        batch: dict[str, Any] = {"task": task}
        if task == "text_to_image":
            captions = ["" if self.caption_dropped(s["draw"]) else s["caption"] for s in samples]
            rows = [self.generation_prompt(caption) for caption in captions]
            batch["captions"] = captions
            batch["pixels"] = torch.stack([s["pixels"] for s in samples])
            if "region_labels" in samples[0]:  # condition probes: a dropped caption's labels count for nothing
                labels = torch.stack([s["region_labels"] for s in samples])
                labels[torch.tensor([not c for c in captions])] = IGNORE_INDEX
                batch["region_labels"] = labels
            label_rows = None
        elif task == "image_to_text":
            rows, label_rows = zip(*(self.conversation(s["turns"]) for s in samples))
            batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        elif task == "text":
            rows = [self.document(s["text"]) for s in samples]
            label_rows = rows
        elif task == "reconstruction":
            rows = [self.reconstruction_prompt()] * len(samples)
            batch["pixels"] = torch.stack([s["pixels"] for s in samples])
            label_rows = None
        else:
            raise ValueError(f"unknown task {task!r}")
        if "pixels" in batch and all("image_key" in s for s in samples):
            batch["image_keys"] = [s["image_key"] for s in samples]  # the latent cache's keys (training.latent_cache)
        batch["input_ids"] = self.pad(rows, self.pad_id)
        batch["attention_mask"] = self.pad([[1] * len(row) for row in rows], 0)
        if label_rows is not None:
            batch["labels"] = self.pad(label_rows, IGNORE_INDEX)
        return batch
