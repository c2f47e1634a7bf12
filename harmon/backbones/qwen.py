"""Qwen2 / Qwen2.5 language backbones on transformers' ``Qwen2ForCausalLM``.

Attention: SDPA by default; ``flash_attention_2`` when flash-attn is installed and the model runs on CUDA
(``attn_implementation="auto"``); ``eager`` on request.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import is_flash_attn_2_available

from harmon.registry import BACKBONES


class QwenBackboneConfig(BaseModel):
    """The Qwen2 architecture fields Harmon uses (everything else keeps transformers' defaults). Numbers are
    strict (``"64"`` or ``True`` is no size) and the attention shape is checked, each error naming its field."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    vocab_size: PositiveInt = 151936
    hidden_size: PositiveInt = 896
    intermediate_size: PositiveInt = 4864
    num_hidden_layers: PositiveInt = 24
    num_attention_heads: PositiveInt = 14
    num_key_value_heads: PositiveInt = 2
    max_position_embeddings: PositiveInt = 32768
    rope_theta: float = Field(1_000_000.0, gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: bool = True
    attn_implementation: str = Field("auto", pattern="^(auto|sdpa|eager|flash_attention_2)$")

    @model_validator(mode="after")
    def _attention_shape(self) -> "QwenBackboneConfig":
        # transformers accepts these and fails (or silently mis-shapes) only at the first forward
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"hidden_size / num_attention_heads ({self.hidden_size // self.num_attention_heads}) must be even "
                "(rotary position embedding)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        return self

    def to_transformers(self) -> Qwen2Config:
        fields = self.model_dump(exclude={"attn_implementation", "rope_theta"})
        config = Qwen2Config(**fields, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        config._attn_implementation = resolve_attn_implementation(self.attn_implementation)
        return config


QWEN_PRESETS: dict[str, dict] = {
    "qwen2": {},  # generic: Qwen2.5-0.5B defaults, every field overridable
    # Qwen2.5-0.5B-Instruct / Qwen2.5-1.5B-Instruct architecture (weights come from a local folder or checkpoint)
    "qwen2.5-0.5b-instruct": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "qwen2.5-1.5b-instruct": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
    "qwen2-tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    ),
}


def resolve_attn_implementation(requested: str = "auto", device: torch.device | str | None = None) -> str:
    """``auto`` → flash_attention_2 when installed and on CUDA, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and not is_flash_attn_2_available():
            raise ValueError("attn_implementation='flash_attention_2' needs flash-attn: pip install 'harmon[cuda]'")
        return requested
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "flash_attention_2" if (on_cuda and is_flash_attn_2_available()) else "sdpa"


def build_qwen_backbone(config: QwenBackboneConfig) -> Qwen2ForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` of the given shape, in eval mode."""
    return Qwen2ForCausalLM(config.to_transformers()).eval()


def load_qwen_config(folder: str | os.PathLike, attn_implementation: str = "auto") -> Qwen2Config:
    """The ``Qwen2Config`` of a local Qwen folder (as ``save_pretrained`` writes it)."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Qwen model folder: no config.json there")
    config = Qwen2Config.from_pretrained(str(path))
    config._attn_implementation = resolve_attn_implementation(attn_implementation)
    return config


def qwen_from_config(config: Qwen2Config) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(config).eval()


def load_qwen_weights(model: Qwen2ForCausalLM, folder: str | os.PathLike) -> None:
    """Load a local transformers Qwen folder's weights into the built ``model``, strictly (the backbone's
    ``pretrained``; errors name the folder and the keys)."""
    from harmon.checkpoints import CheckpointKeyError, load_state_dict_strict

    load_qwen_config(folder)  # a folder that is not a Qwen model folder is named
    pretrained, info = Qwen2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    problems = [  # transformers would initialise a missing tensor at random: judged here instead
        f"{label}: {', '.join(sorted(str(k) for k in keys))}"
        for label, keys in (("missing keys", info["missing_keys"]), ("unexpected keys", info["unexpected_keys"]),
                            ("mis-shaped keys", info.get("mismatched_keys", ())))
        if keys
    ]
    if problems:
        raise CheckpointKeyError(f"{folder} does not fit Qwen2ForCausalLM: " + "; ".join(problems))
    load_state_dict_strict(model, pretrained.state_dict(), str(folder))


for _name, _preset in QWEN_PRESETS.items():
    BACKBONES.add(_name, Qwen2ForCausalLM, config_class=QwenBackboneConfig, builder=build_qwen_backbone,
                  weights_loader=load_qwen_weights, **_preset)
