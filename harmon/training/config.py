"""Training recipes as data: the pydantic schema of a stage YAML, and its loader.

A recipe names the model to train (a preset or a saved folder), which of :class:`~harmon.model.HarmonModel`'s
modules train and at which learning rate, the optimiser and schedule, the batch geometry, the data sources of the
three tasks with their mixing ratio, and where checkpoints and the export go. Every section forbids unknown keys,
so a typo fails at load time with the field's name; files are checked to exist before any model is built (pass
``check_files=False`` to validate a recipe on a machine without its data).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    model_validator,
)

TASKS = ("text", "image_to_text", "text_to_image", "reconstruction")
"""The training tasks: the paper's three, in its order (Table 1 gives ratios text : image→text : text→image), then
RecA's reconstruction (generation conditioned on the model's own understanding embeddings of the target image;
Xie et al., 2025, arXiv 2509.07295). New tasks go at the end: a task's position seeds its sample stream."""

CORE_MODULES = ("encoder", "decoder", "head", "llm", "proj_in", "proj_out")
OPTIONAL_MODULES = ("understanding_encoder", "understanding_proj_in")
"""Present only in a decoupled design (a separate understanding encoder); skipped when the model has none."""
MODULE_NAMES = (*CORE_MODULES, *OPTIONAL_MODULES, "vae")
"""Trainable units: the attributes of :class:`~harmon.model.HarmonModel` holding parameters."""

LR_FALLBACKS = {
    "head": "decoder", "proj_in": "decoder", "proj_out": "decoder",
    "understanding_proj_in": "decoder", "understanding_encoder": "encoder",
}
"""Modules that train with another module's learning rate unless configured: the head and the connectors with
the decoder's (as the recipes of the paper state), a decoupled understanding encoder with the encoder's."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .nan / .inf in a recipe: refused, named


def _check_files(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_files", True))


# ------------------------------------------------------------------------------------------------------- model
class ModelSource(_Strict):
    """Where the model comes from: exactly one of ``preset`` (random init, optionally with initial LLM / VAE
    weights) and ``pretrained`` (a folder written by ``HarmonModel.save_pretrained``, e.g. the previous stage's
    ``export/harmon_model``)."""

    preset: str | None = None
    pretrained: Path | None = None
    tokenizer: Path | None = Field(
        None,
        description="tokenizer folder; the `tiny` preset uses harmon.testing.tiny_tokenizer(), a `pretrained` "
        "folder defaults to itself (or its `tokenizer/` subfolder)",
    )
    llm_weights: Path | None = Field(None, description="Qwen folder whose weights initialise `llm` (preset only)")
    vae_checkpoint: Path | None = Field(None, description="MAR's kl16.ckpt for the VAE (preset only)")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="HarmonConfig fields set over the preset (preset only), e.g. a decoupled understanding encoder: "
        "{understanding_encoder: {name: siglip-base-patch16-256, pretrained: <folder>}} (weights loaded after "
        "building)",
    )
    image_token: str = "<image>"

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "ModelSource":
        if (self.preset is None) == (self.pretrained is None):
            raise ValueError("model: give exactly one of model.preset and model.pretrained")
        if self.pretrained is not None and (self.llm_weights or self.vae_checkpoint):
            raise ValueError("model.llm_weights / model.vae_checkpoint only apply to a model.preset")
        if self.preset is not None:
            from harmon.configs import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"model.preset: unknown preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
            if self.preset != "tiny" and self.tokenizer is None:
                raise ValueError(f"model.tokenizer: a tokenizer folder is needed for preset {self.preset!r}")
            if self.config_overrides:
                self.harmon_config()  # a bad or ill-fitting field fails here, at load time
        elif self.config_overrides:
            raise ValueError("model.config_overrides only apply to a model.preset (a pretrained folder keeps its config)")
        if _check_files(info):
            for field in ("pretrained", "tokenizer", "llm_weights"):
                path = getattr(self, field)
                if path is not None and not path.is_dir():
                    raise ValueError(f"model.{field}: folder not found: {path}")
            if self.vae_checkpoint is not None and not self.vae_checkpoint.is_file():
                raise ValueError(f"model.vae_checkpoint: file not found: {self.vae_checkpoint}")
        return self

    def harmon_config(self):
        """The :class:`~harmon.configs.HarmonConfig` of a ``preset`` source, ``config_overrides`` applied."""
        from harmon.configs import HarmonConfig

        try:
            return HarmonConfig.from_preset(self.preset, **self.config_overrides)
        except (ValueError, TypeError, KeyError) as error:  # pydantic's ValidationError is a ValueError; an
            raise ValueError(f"model.config_overrides: {error}") from error  # unknown component a KeyError


# ------------------------------------------------------------------------------------------------------- data
class CaptionSource(_Strict):
    """Image–caption pairs in the original release's layout: ``data_info`` is a JSON list of
    ``{"image": <path>, "annotation": <path>}``; each annotation file is JSON holding ``{"caption": ...}``.
    Image paths are relative to ``image_folder``, annotation paths to ``annotation_folder`` (both default to the
    folder of ``data_info``). Used by ``text_to_image`` (caption → prompt) and by ``image_to_text`` (captioning:
    ``question`` → caption)."""

    format: Literal["caption"] = "caption"
    data_info: Path
    image_folder: Path | None = None
    annotation_folder: Path | None = None
    caption_key: str = "caption"
    question: str = "Describe this image."


class LlavaSource(_Strict):
    """Understanding conversations in LLaVA's JSON form: a list of ``{"image": <path>, "conversations":
    [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", "value": "…"}, …]}``; image paths relative to
    ``image_folder`` (default: the JSON's folder). Entries without an image are skipped."""

    format: Literal["llava"] = "llava"
    path: Path
    image_folder: Path | None = None


class ImageFolderSource(_Strict):
    """A folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``; sub-folders included, sorted by
    path). Feeds ``reconstruction``, which needs images only."""

    format: Literal["images"] = "images"
    folder: Path


class TextSource(_Strict):
    """Plain text: a ``.jsonl`` file of ``{"text": ...}`` objects or a ``.txt`` file, one document per line."""

    format: Literal["text"] = "text"
    path: Path
    text_key: str = "text"


_ALLOWED_FORMATS = {
    "text": ("text",), "image_to_text": ("llava", "caption"), "text_to_image": ("caption",),
    "reconstruction": ("images", "caption", "llava"),  # the images only: captions and conversations are ignored
}


class TaskRatios(_Strict):
    """Micro-batches of each task per cycle (paper Table 1: 0:1:2, 1:3:8, 1:3:16; RecA on Harmon: reconstruction
    2 : image→text 2 : text→image 0)."""

    text: NonNegativeInt = 0
    image_to_text: NonNegativeInt = 0
    text_to_image: NonNegativeInt = 0
    reconstruction: NonNegativeInt = 0

    @model_validator(mode="after")
    def _not_all_zero(self) -> "TaskRatios":
        if sum(self.as_dict().values()) == 0:
            raise ValueError("data.ratios: the task ratios sum to 0; give at least one task a positive ratio")
        return self

    def as_dict(self) -> dict[str, int]:
        return {task: getattr(self, task) for task in TASKS}


Source = Annotated[CaptionSource | LlavaSource | TextSource | ImageFolderSource, Field(discriminator="format")]


class SyntheticShapes(_Strict):
    """Build :mod:`harmon.training.synthetic`'s shapes data at ``data.root`` when it is absent (the smoke recipe:
    a fresh clone trains without a separate data step). Written by the trainer, never by ``--check``."""

    count: PositiveInt = 48
    size: PositiveInt = 64
    seed: int = 0


class DataConfig(_Strict):
    root: Path | None = Field(None, description="relative source paths are resolved against this folder")
    synthetic: SyntheticShapes | None = Field(
        None, description="write the synthetic shapes set at `root` when it is absent (needs `root`)"
    )
    image_size: PositiveInt = 256
    max_length: PositiveInt = Field(1024, description="tokens per understanding / text sample (image included)")
    max_prompt_length: PositiveInt = Field(128, description="tokens of a text-to-image prompt")
    cfg_drop_prob: float = Field(0.1, ge=0, le=1, description="share of captions replaced by the empty one")
    reconstruction_instruction: str = Field(
        "",
        description="reconstruction prompt: generation_prefix + <image> (+ newline + this text when not empty), "
        "in the chat template; never dropped for guidance",
    )
    num_workers: NonNegativeInt = 4
    ratios: TaskRatios
    text: list[Source] = Field(default_factory=list)
    image_to_text: list[Source] = Field(default_factory=list)
    text_to_image: list[Source] = Field(default_factory=list)
    reconstruction: list[Source] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sources_fit(self, info: ValidationInfo) -> "DataConfig":
        ratios = self.ratios.as_dict()
        for task in TASKS:
            sources = getattr(self, task)
            for i, source in enumerate(sources):
                if source.format not in _ALLOWED_FORMATS[task]:
                    raise ValueError(
                        f"data.{task}[{i}].format: {source.format!r} cannot feed {task}; "
                        f"use one of {_ALLOWED_FORMATS[task]}"
                    )
            if ratios[task] > 0 and not sources:
                raise ValueError(f"data.ratios.{task} is {ratios[task]} but data.{task} lists no source")
        if self.synthetic is not None and self.root is None:
            raise ValueError("data.synthetic: needs data.root (the folder the shapes set is written to)")
        if _check_files(info) and not self.synthetic_pending():
            for task in TASKS:
                for i, source in enumerate(getattr(self, task)):
                    if ratios[task] == 0:
                        continue
                    if isinstance(source, ImageFolderSource):
                        if not self.resolve(source.folder).is_dir():
                            raise ValueError(f"data.{task}[{i}].folder: folder not found: {self.resolve(source.folder)}")
                        continue
                    field = "data_info" if isinstance(source, CaptionSource) else "path"
                    path = self.resolve(getattr(source, field))
                    if not path.is_file():
                        raise ValueError(f"data.{task}[{i}].{field}: file not found: {path}")
                    for folder_field in ("image_folder", "annotation_folder"):
                        folder = getattr(source, folder_field, None)
                        if folder is not None and not self.resolve(folder).is_dir():
                            raise ValueError(
                                f"data.{task}[{i}].{folder_field}: folder not found: {self.resolve(folder)}"
                            )
        return self

    def synthetic_pending(self) -> bool:
        """Whether ``synthetic`` data is configured and not yet written at ``root`` (the trainer writes it)."""
        from harmon.training.synthetic import shapes_dataset_complete

        return self.synthetic is not None and not shapes_dataset_complete(os.path.expanduser(self.root))

    def resolve(self, path: Path) -> Path:
        path = Path(os.path.expanduser(path))
        if path.is_absolute() or self.root is None:
            return path
        return Path(os.path.expanduser(self.root)) / path


# ----------------------------------------------------------------------------------------------- optimisation
class OptimizerConfig(_Strict):
    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.02
    max_grad_norm: PositiveFloat | None = 1.0


class ScheduleConfig(_Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of each group's lr")


class LossWeights(_Strict):
    text: NonNegativeFloat = 1.0
    image_to_text: NonNegativeFloat = 1.0
    text_to_image: NonNegativeFloat = 1.0
    reconstruction: NonNegativeFloat = 1.0


ConditionSource = Literal["training", "prompt_only"]


class ConditionProbeConfig(_Strict):
    """Condition probes (:mod:`harmon.training.probes`): an auxiliary loss on text→image micro-batches, linear
    classifiers on region averages of the MAR decoder's conditions against the captions' ``region_labels``
    (each annotation: ``{"caption": ..., "region_labels": {region: {target: class}}}``). Trained, never exported."""

    weight: PositiveFloat = Field(description="the probes' loss is added to the text→image loss times this")
    lr: PositiveFloat = Field(1.0e-3, description="AdamW learning rate of the probes (no weight decay)")
    regions: dict[str, tuple[float, float, float, float]] = Field(
        description="name → box (x0, y0, x1, y1) in fractions of the image width and height"
    )
    targets: dict[str, PositiveInt] = Field(description="name → number of classes")
    labels_key: str = Field("region_labels", description="the annotations' key holding the labels")
    conditions: ConditionSource | dict[str, ConditionSource] = Field(
        "training",
        description="which conditions each probe reads — one source for every target, or target → source (targets "
        "not named read 'training'). training: the training mask's conditions (visible tokens can answer too); "
        "prompt_only: the conditions of the same prompts with every token masked (MAR's first step: nothing of the "
        "image is visible, so only the caption can answer; one more forward per batch)",
    )

    first_step_diffusion: NonNegativeFloat = Field(
        0.0,
        description="also the diffusion loss on the prompt-only conditions (every token masked, as at MAR's first "
        "step), added to the text→image loss times this; 0: off. The head then has to draw from what the caption "
        "put in the conditions, not only from the visible tokens",
    )

    region_masking: float = Field(
        0.0, ge=0.0, le=1.0,
        description="the probability that a text→image sample's training mask also masks every token of one of the "
        "regions (chosen uniformly), for the diffusion loss and the probes alike: the state of MAR's sampling when a "
        "region's first token is drawn (other tokens drawn, none of that region), which the training mask almost "
        "never gives (it leaves a few tokens of most regions visible, and they show what the region holds); 0: off",
    )

    def source_of(self, target: str) -> str:
        """The conditions ``target``'s probe reads (``training`` or ``prompt_only``)."""
        if isinstance(self.conditions, str):
            return self.conditions
        return self.conditions.get(target, "training")

    @model_validator(mode="after")
    def _boxes(self) -> "ConditionProbeConfig":
        if not self.regions or not self.targets:
            raise ValueError("condition_probes: regions and targets each need at least one entry")
        for name, (x0, y0, x1, y1) in self.regions.items():
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(
                    f"condition_probes.regions.{name}: {(x0, y0, x1, y1)} is not a box (x0, y0, x1, y1) with "
                    "0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1"
                )
        if isinstance(self.conditions, dict):
            unknown = sorted(set(self.conditions) - set(self.targets))
            if unknown:
                raise ValueError(
                    f"condition_probes.conditions: {unknown} name no target (the targets: {sorted(self.targets)})"
                )
        for name, classes in self.targets.items():
            if classes < 2:
                raise ValueError(f"condition_probes.targets.{name}: {classes} class(es); a classifier needs ≥ 2")
        return self


class TrainingConfig(_Strict):
    max_steps: PositiveInt
    global_batch_size: PositiveInt
    micro_batch_size: PositiveInt = Field(description="samples per device per forward")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 elsewhere"
    )
    gradient_checkpointing: bool = False
    latent_cache_size: NonNegativeInt = Field(
        0, description="images whose frozen-VAE tokens are kept in memory after their first encoding and reused "
        "(exact: the VAE is frozen and the preprocessing deterministic; harmon.training.latent_cache); 0: off, "
        "every draw is encoded",
    )
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 1000
    keep_last: PositiveInt = 3
    log_with: Literal["auto", "tensorboard", "none"] = "auto"


class TrainConfig(_Strict):
    """A whole run: ``experiments/configs/stage*_*.yaml`` and ``smoke.yaml`` are instances."""

    stage: Literal[1, 2, 3] | None = None
    run_name: str = "harmon"
    seed: int = 0
    output_dir: Path
    model: ModelSource
    frozen_modules: list[str] = Field(default_factory=list, description="the VAE is always frozen")
    learning_rates: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="per module; head, proj_in and proj_out default to the decoder's"
    )  # see LR_FALLBACKS
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    training: TrainingConfig
    loss_weights: LossWeights = LossWeights()
    condition_probes: ConditionProbeConfig | None = Field(
        None, description="auxiliary region classifiers on the text→image conditions (none: off)"
    )
    data: DataConfig

    @model_validator(mode="after")
    def _modules(self) -> "TrainConfig":
        known = ", ".join(MODULE_NAMES)
        for field, names in (("frozen_modules", self.frozen_modules), ("learning_rates", list(self.learning_rates))):
            for name in names:
                if name not in MODULE_NAMES:
                    raise ValueError(f"{field}: unknown module {name!r} (HarmonModel modules: {known})")
        if "vae" in self.learning_rates:
            raise ValueError("learning_rates.vae: the VAE is always frozen")
        for name in self.frozen_modules:
            if name in self.learning_rates:
                raise ValueError(f"learning_rates.{name}: {name} is listed in frozen_modules")
        for name in self.trainable_modules:
            if name in CORE_MODULES:
                self.module_lr(name)  # raises when a trainable module has no learning rate
        if not any(name in CORE_MODULES for name in self.trainable_modules):
            raise ValueError("frozen_modules: every module is frozen, nothing would train")
        return self

    @model_validator(mode="after")
    def _probes_need_generation(self) -> "TrainConfig":
        if self.condition_probes is not None and self.data.ratios.as_dict()["text_to_image"] == 0:
            raise ValueError("condition_probes: they read text→image batches, but data.ratios.text_to_image is 0")
        return self

    @property
    def trainable_modules(self) -> list[str]:
        return [name for name in MODULE_NAMES if name != "vae" and name not in self.frozen_modules]

    def module_lr(self, name: str) -> float:
        if name in self.learning_rates:
            return self.learning_rates[name]
        base = LR_FALLBACKS.get(name)
        if base is not None and base in self.learning_rates:
            return self.learning_rates[base]
        fallback = f" (or learning_rates.{base}, which it defaults to)" if base else ""
        raise ValueError(
            f"learning_rates.{name} is needed{fallback}: {name} is trainable (list it in frozen_modules to freeze it)"
        )


# ------------------------------------------------------------------------------------------------------ loading
def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Set dotted keys (``training.max_steps=10`` or ``{"data.root": "/x"}``; strings are YAML-parsed)."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({' '.join(str(error).split())})") from None


def load_config(
    path: str | os.PathLike | None = None,
    *,
    data: dict[str, Any] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    check_files: bool = True,
) -> TrainConfig:
    """Read a recipe YAML (or take ``data``), apply ``overrides`` and validate it."""
    if (path is None) == (data is None):
        raise ValueError("give exactly one of path and data")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:  # a syntax error: one line, naming the file
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a YAML mapping")
    data = apply_overrides(copy.deepcopy(data), overrides)
    return TrainConfig.model_validate(data, context={"check_files": check_files})


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
