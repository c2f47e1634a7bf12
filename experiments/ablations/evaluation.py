"""Periodic evaluation during a stage run: held-out data, the context metrics receive, and the trainer callback.

The held-out samples are read through the training engine's own data path (:class:`harmon.training.data.
MultiTaskDataset` on a :class:`~harmon.training.config.DataConfig`) and batched by its collator
(:class:`harmon.training.collator.HarmonCollator`, captions never dropped), so a held-out prompt is built exactly
as a training prompt. The :class:`Evaluator` is a ``Trainer`` callback (``harmon.training.trainer.Trainer(...,
callbacks=[...])``): every ``evaluation.every`` optimizer steps and at the stage's last step it puts the model in
eval mode, runs the metrics on the main process (others wait) with the global random streams forked — so the
training run does not depend on how often it is evaluated — and appends a row to ``eval.jsonl`` in the run folder.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.ablations.config import EvaluationConfig, HeldOut, StageRun
from experiments.ablations.metrics import Metric, MetricSkipped, finite
from harmon.training.collator import HarmonCollator
from harmon.training.config import CaptionSource, DataConfig, LlavaSource
from harmon.training.data import MultiTaskDataset
from harmon.training.modules import understanding_tokens

EVAL_FILE = "eval.jsonl"


class HeldOutData:
    """Held-out caption pairs and questions (first turn of each conversation), read once per image size."""

    def __init__(self, heldout: HeldOut) -> None:
        self.config = heldout
        self.captions = heldout.resolve(heldout.captions)
        self.qa = heldout.resolve(heldout.qa)
        self._cache: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def check(self) -> None:
        for what, path in (("captions", self.captions), ("qa", self.qa)):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"evaluation.heldout.{what}: file not found: {path}")

    def samples(self, task: str, image_size: int) -> list[dict[str, Any]]:
        key = (task, image_size)
        if key not in self._cache:
            path = self.captions if task == "text_to_image" else self.qa
            if path is None:
                self._cache[key] = []
                return []
            source = CaptionSource(data_info=path) if task == "text_to_image" else LlavaSource(path=path)
            data = DataConfig(image_size=image_size, num_workers=0, ratios={task: 1}, **{task: [source]})
            dataset = MultiTaskDataset(data)
            count = min(dataset.task_size(task), self.config.max_samples)
            samples = [dataset[(task, i, i)] for i in range(count)]
            if task == "image_to_text":
                for sample in samples:
                    sample["turns"] = sample["turns"][:1]  # one question, one reference answer
            self._cache[key] = samples
        return self._cache[key]


@dataclass
class EvalContext:
    """What a metric gets: the model (eval mode, no grad), its tokenizer, held-out data at ``image_size``."""

    model: Any
    tokenizer: Any
    image_token_id: int
    heldout: HeldOutData
    image_size: int
    batch_size: int
    seed: int
    device: torch.device
    step: int
    stage: str
    output_dir: Path | None
    max_length: int = 4096
    max_prompt_length: int = 128
    _collator: HarmonCollator | None = field(default=None, repr=False)

    def collator(self) -> HarmonCollator:
        if self._collator is None:
            config = self.model.config
            image_tokens = understanding_tokens(self.model, self.image_size)
            self._collator = HarmonCollator(
                self.tokenizer, image_token_id=self.image_token_id, image_tokens=image_tokens,
                prompt_template=config.prompt_template, generation_prefix=config.generation_prefix,
                unconditional_prompt=config.unconditional_prompt,
                max_length=max(self.max_length, image_tokens + 64), max_prompt_length=self.max_prompt_length,
                cfg_drop_prob=0.0, seed=self.seed,
            )
        return self._collator

    def _batches(self, task: str) -> Iterator[list[dict[str, Any]]]:
        samples = self.heldout.samples(task, self.image_size)
        for start in range(0, len(samples), self.batch_size):
            yield samples[start:start + self.batch_size]

    def caption_batches(self) -> Iterator[dict[str, Any]]:
        """Collated text→image batches (``pixels``, ``input_ids``, ``attention_mask``, ``captions``)."""
        for chunk in self._batches("text_to_image"):
            yield self.collator()(chunk)

    def qa_batches(self) -> Iterator[tuple[dict[str, Any], list[tuple[str, str]]]]:
        """Collated image→text batches (reference answers as labels) with their ``(question, answer)`` pairs."""
        for chunk in self._batches("image_to_text"):
            yield self.collator()(chunk), [s["turns"][0] for s in chunk]

    def greedy_answers(self, pixels: torch.Tensor, questions: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers through the model's understanding API with the prompt contract of
        ``HarmonPipeline.understand`` (its :class:`~harmon.pipelines.HarmonProcessor`: chat prompt with the
        placeholders, left padding, ``<|im_end|>`` / ``<|endoftext|>`` stop), from pixels already prepared as the
        training data prepares them."""
        model, processor = self.model, self.collator().processor
        embeds = model.image_embeddings(pixels.to(self.device))
        input_ids, attention_mask = processor.understanding_inputs(questions, embeds.shape[1])
        inputs_embeds = model.splice_image_embeddings(input_ids, embeds, processor.image_token_id)
        new_ids = model.answer(inputs_embeds, attention_mask.to(self.device), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=processor.stop_token_ids,
                               pad_token_id=processor.pad_token_id)
        tokenizer = processor.tokenizer
        return [a.strip() for a in tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    def pipeline(self):
        """A ``HarmonPipeline`` sharing this model's modules (for metrics that generate images)."""
        from harmon.pipelines import HarmonPipeline

        pipe = HarmonPipeline.from_model(self.model, self.tokenizer)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Evaluator:
    """The trainer callback of one stage run (see the module docstring)."""

    def __init__(self, run: StageRun, evaluation: EvaluationConfig, metrics: dict[str, Metric],
                 heldout: HeldOutData, tokenizer: Any = None, log: Callable[[str], None] = print) -> None:
        self.run, self.evaluation, self.metrics, self.heldout = run, evaluation, metrics, heldout
        self.tokenizer = tokenizer
        self.log = log
        self.skipped: dict[str, str] = {}
        self.window: dict[str, list[float]] = defaultdict(list)
        self.path = run.output_dir / EVAL_FILE
        self.seconds = 0.0

    def resume_at(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run re-evaluates what came after its checkpoint)."""
        rows = [r for r in read_rows(self.path) if r["stage_step"] <= step]
        if self.path.exists():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def __call__(self, trainer, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key.startswith("loss/"):
                self.window["train/" + key.removeprefix("loss/")].append(float(value))
        step = int(record["step"])
        if step % self.evaluation.every == 0 or step == self.run.max_steps:
            self.evaluate(trainer, step)

    def image_size(self) -> int:
        return self.evaluation.image_size or self.run.config.data.image_size

    def evaluate(self, trainer, step: int) -> dict[str, Any] | None:
        accelerator = trainer.accelerator
        row = None
        if accelerator.is_main_process:
            started = time.perf_counter()
            row = {"stage": self.run.stage, "stage_step": step, "step": self.run.step_offset + step,
                   "image_size": self.image_size()}
            row.update({k: float(np.mean(v)) for k, v in sorted(self.window.items())})
            module = accelerator.unwrap_model(trainer.module)
            module.eval()
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            data = self.run.config.data
            ctx = EvalContext(
                model=trainer.model, tokenizer=self.tokenizer or trainer.tokenizer,
                image_token_id=trainer.image_token_id, heldout=self.heldout, image_size=self.image_size(),
                batch_size=self.evaluation.batch_size, seed=self.evaluation.seed, device=accelerator.device,
                step=step, stage=self.run.stage, output_dir=self.run.output_dir,
                max_length=data.max_length, max_prompt_length=data.max_prompt_length,
            )
            autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()
            try:
                with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast:
                    for name, metric in self.metrics.items():
                        if name in self.skipped:
                            continue
                        try:
                            values = metric(ctx)
                        except MetricSkipped as reason:
                            self.skipped[name] = str(reason)
                            self.log(f"[{self.run.stage}] metric {name} skipped: {reason}")
                            continue
                        if not finite(values):
                            self.log(f"[{self.run.stage}] metric {name} at step {step} is not finite: {values}")
                        row.update({k: float(v) for k, v in values.items()})
            finally:
                module.train()
            row["eval_seconds"] = time.perf_counter() - started
            self.seconds += row["eval_seconds"]
            self.window.clear()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if k not in ("stage", "stage_step", "step", "image_size", "eval_seconds")
                              and not k.startswith("train/"))
            self.log(f"[{self.run.stage} step {step}/{self.run.max_steps}] {shown}")
        accelerator.wait_for_everyone()
        return row


__all__ = ["EVAL_FILE", "EvalContext", "Evaluator", "HeldOutData", "read_rows"]
