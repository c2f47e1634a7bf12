"""The model side of training: building the model and tokenizer of a recipe, freezing, per-module AdamW
parameter groups, gradient checkpointing, and the ``nn.Module`` whose ``forward`` computes one task's loss."""

from __future__ import annotations

import inspect
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmon.model import HarmonModel
from harmon.training.config import MODULE_NAMES, ConditionProbeConfig, ModelSource, TrainConfig
from harmon.training.latent_cache import LatentCache
from harmon.training.probes import ConditionProbes

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- building
def _tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(source.tokenizer))
    if source.preset == "tiny":
        from harmon.testing import tiny_tokenizer

        return tiny_tokenizer()
    folder = Path(source.pretrained)
    for candidate in (folder, folder / "tokenizer"):
        if _tokenizer_files(candidate):
            return AutoTokenizer.from_pretrained(str(candidate))
    raise FileNotFoundError(
        f"model.tokenizer: no tokenizer in {folder} or {folder / 'tokenizer'}; set model.tokenizer to a folder"
    )


def build_model(source: ModelSource) -> HarmonModel:
    """A model from a preset (built, then ``llm_weights`` / ``vae_checkpoint`` and any component spec's
    ``pretrained`` weights loaded, strictly) or a folder."""
    if source.pretrained is not None:
        return HarmonModel.from_pretrained(source.pretrained)
    config = source.harmon_config()  # the preset, config_overrides applied
    if source.llm_weights is not None:  # the backbone's pretrained weights: loaded after building, never saved
        config = config.model_copy(update={"backbone": config.backbone.model_copy(
            update={"pretrained": str(source.llm_weights)})})
    model = HarmonModel.from_config(config)  # built, then every component spec's pretrained weights loaded
    if source.vae_checkpoint is not None:
        from harmon.encoders.vae import load_ldm_kl_checkpoint

        model.vae.load_state_dict(load_ldm_kl_checkpoint(source.vae_checkpoint, model.config.vae).state_dict())
    return model


def image_token_id(tokenizer, model: HarmonModel, token: str = "<image>") -> int:
    """The id of the image placeholder; added to the tokenizer as a special token when it is not one token."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        ids = tokenizer(token, add_special_tokens=False).input_ids
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    if len(ids) != 1 or ids[0] >= vocab:
        raise ValueError(f"model.image_token: {token!r} is not a single token id below the LLM vocabulary ({vocab})")
    return int(ids[0])


def understanding_tokens(model: HarmonModel, image_size: int) -> int:
    """How many ``<image>`` placeholders one understanding image takes: ``m·n + buffer_size`` for the shared MAR
    encoder; for a decoupled understanding encoder, what its path yields on a probe image."""
    if getattr(model, "understanding_encoder", None) is None:
        grid = image_size // model.config.latent_stride
        return grid * grid + model.buffer_size
    with torch.no_grad():
        return int(model.image_embeddings(torch.zeros(1, 3, image_size, image_size)).shape[1])


def condition_width(model: HarmonModel) -> int:
    """Width of the MAR decoder's per-token conditions: what the diffusion head reads (``cond_dim``)."""
    return int(model.head.config.cond_dim)


# ---------------------------------------------------------------------------------------------------- freezing
def apply_freezing(model: HarmonModel, config: TrainConfig) -> dict[str, nn.Module]:
    """``requires_grad`` per module (the VAE always frozen); returns the trainable modules by name."""
    children = dict(model.named_children())
    uncovered = sorted(set(children) - set(MODULE_NAMES))
    if uncovered:
        raise ValueError(
            f"HarmonModel has modules the training config does not know: {uncovered} (known: {MODULE_NAMES})"
        )
    trainable = {}
    for name in MODULE_NAMES:
        module = children.get(name)
        if module is None:
            continue
        train = name in config.trainable_modules
        module.requires_grad_(train)
        if train:
            trainable[name] = module
    return trainable


def parameter_groups(modules: dict[str, nn.Module], config: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group per module and decay kind: weights (≥ 2-D) decay, biases / norms / embeddings-like vectors
    don't. Each group carries ``module`` (its HarmonModel attribute) and ``name``."""
    groups, seen = [], set()
    for name, module in modules.items():
        decay, no_decay = [], []
        for parameter in module.parameters():
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        lr = config.module_lr(name)
        for params, weight_decay, suffix in (
            (decay, config.optimizer.weight_decay, ""),
            (no_decay, 0.0, "/no_decay"),
        ):
            if params:
                groups.append(
                    {"params": params, "lr": lr, "weight_decay": weight_decay, "module": name, "name": name + suffix}
                )
    return groups


# ------------------------------------------------------------------------------------------ gradient checkpointing
def enable_gradient_checkpointing(model: HarmonModel) -> list[str]:
    """Activation checkpointing where the components support it: transformers' activation (gradient)
    checkpointing on the LLM; torch's ``checkpoint_wrapper`` around each block of the encoder's, decoder's and
    head's block lists (their state-dict keys are unchanged: the wrapper strips its prefix). The MAR components
    have no checkpointing switch of their own, hence the wrapper. Returns what was enabled."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    enabled = []
    kwargs = {"use_reentrant": False}
    if hasattr(model.llm, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        enabled.append("llm")
    elif hasattr(model.llm, "gradient_checkpointing_enable"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        enabled.append("llm")
    for name in ("encoder", "decoder", "head"):
        module = getattr(model, name)
        blocks = {id(block) for sub in module.modules() if isinstance(sub, nn.ModuleList) for block in sub}
        if not blocks:
            continue
        apply_activation_checkpointing(
            module,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda sub, ids=blocks: id(sub) in ids,
        )
        enabled.append(name)
    return enabled


# ------------------------------------------------------------------------------------------------ task losses
class HarmonTrainingModule(nn.Module):
    """Wraps a :class:`HarmonModel` so that every task's loss goes through one ``forward`` — what DDP, FSDP and
    DeepSpeed hook into (calling the model's methods directly would bypass their gradient synchronisation)."""

    def __init__(
        self, model: HarmonModel, image_token_id: int, probes: ConditionProbeConfig | None = None,
        latent_cache_size: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.image_token_id = image_token_id
        # the frozen VAE's tokens of each training image, encoded once (harmon.training.latent_cache); None: off
        self.latent_cache = LatentCache(latent_cache_size) if latent_cache_size > 0 else None
        # training-only region classifiers on the text→image conditions (harmon.training.probes); not in `model`,
        # so never exported
        self.probes = None
        self.probe_weight = 0.0
        self.first_step_weight = 0.0
        self.region_masking = 0.0
        if probes is not None:
            self.probes = ConditionProbes(condition_width(model), probes.regions, probes.targets,
                                          {name: probes.source_of(name) for name in probes.targets})
            self.probe_weight = probes.weight
            self.first_step_weight = probes.first_step_diffusion
            self.region_masking = probes.region_masking
        # the last text→image batch's probe loss and accuracy, detached tensors keyed as the trainer logs them
        # (converted there, once per optimizer step: no device sync per micro-batch)
        self.last_probe_metrics: dict[str, torch.Tensor] = {}
        # HarmonModel versions with decoupled understanding encoders take the pixels as well
        self._loss_takes_pixels = "pixels" in inspect.signature(model.image_to_text_loss).parameters

    def train(self, mode: bool = True) -> "HarmonTrainingModule":
        super().train(mode)
        self.model.vae.eval()  # frozen, and encodes deterministically (posterior mode)
        return self

    def image_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """The VAE tokens of ``batch["pixels"]``: from the latent cache for the images it holds (by the batch's
        ``image_keys``), encoded otherwise."""
        keys = batch.get("image_keys")
        if self.latent_cache is None or keys is None:
            return self.model.encode_image(batch["pixels"])
        return self.latent_cache.tokens(self.model.encode_image, batch["pixels"], keys)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        model = self.model
        task = batch["task"]
        if task == "text_to_image":
            tokens = self.image_tokens(batch)
            if self.probes is None:
                return model.text_to_image_loss(
                    tokens, batch["input_ids"], batch["attention_mask"], generator=generator
                )
            batch_size, m, n, _ = tokens.shape
            mask = model.random_training_mask(batch_size, m * n, generator)
            if self.region_masking > 0:
                mask = self.probes.mask_regions(mask, (m, n), self.region_masking, generator)
            conditions = model.text_to_image_conditions(tokens, batch["input_ids"], batch["attention_mask"], mask)
            loss = model.diffusion_loss(tokens, conditions, mask, generator)
            by_source = {"training": conditions}
            if self.first_step_weight > 0 or "prompt_only" in self.probes.sources.values():
                everything = torch.ones_like(mask)  # every token masked: the conditions of MAR's first step
                by_source["prompt_only"] = model.text_to_image_conditions(
                    tokens, batch["input_ids"], batch["attention_mask"], everything
                )
                if self.first_step_weight > 0:
                    loss = loss + self.first_step_weight * model.diffusion_loss(
                        tokens, by_source["prompt_only"], everything, generator)
            probe_loss, accuracy = self.probes(by_source, (m, n), batch["region_labels"])
            self.last_probe_metrics = {"probes/loss": probe_loss.detach(), "probes/accuracy": accuracy}
            if len(self.probes.targets) > 1:
                self.last_probe_metrics.update(
                    {f"probes/accuracy/{name}": value for name, value in self.probes.last_accuracy.items()})
            return loss + self.probe_weight * probe_loss
        if task == "image_to_text":
            pixels = batch["pixels"]
            if not getattr(model, "understanding_reads_pixels", False):
                tokens = self.image_tokens(batch)
            else:
                tokens = None  # a decoupled pixel encoder reads the pixels itself
            args = (tokens, batch["input_ids"], batch["attention_mask"], batch["labels"], self.image_token_id)
            if self._loss_takes_pixels:
                return model.image_to_text_loss(*args, pixels=pixels)
            return model.image_to_text_loss(*args)
        if task == "reconstruction":
            pixels = batch["pixels"]
            return model.reconstruction_loss(
                self.image_tokens(batch), batch["input_ids"], batch["attention_mask"], self.image_token_id,
                pixels=pixels, generator=generator,
            )
        if task == "text":
            # plain-text LM loss through the model's public LLM (transformers shifts the labels)
            output = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"], use_cache=False)
            return output.loss
        raise ValueError(f"unknown task {task!r}")
