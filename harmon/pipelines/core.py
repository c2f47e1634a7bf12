"""``HarmonCore``: the Harmon-specific modules of a pipeline as one diffusers model component.

It holds the generation encoder, the MAR decoder, the diffusion head and the ``proj_in`` / ``proj_out``
connectors (everything but the LLM, the VAE and the tokenizer, which are standard transformers / diffusers
components), and, when the config names a decoupled ``understanding_encoder``, that encoder and its
``understanding_proj_in`` connector (a shared core has neither, so its weights keep the original keys). Its only config entry is the whole :class:`~harmon.configs.HarmonConfig` as a dict, so a saved folder
rebuilds every registered component by name. Keep this module path stable: diffusers finds the class again from
``model_index.json`` as ``harmon.HarmonCore``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from harmon.configs import HarmonConfig
from harmon.layers import mlp_connector
from harmon.model import understanding_input_kind
from harmon.registry import BACKBONES, DECODERS, ENCODERS, HEADS


class HarmonCore(ModelMixin, ConfigMixin):
    """Encoder + decoder + diffusion head + connectors of a Harmon model (see the module docstring)."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, harmon_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = HarmonConfig.model_validate(harmon_config or {})
        hidden = config.backbone.resolve(BACKBONES).hidden_size
        self.encoder = config.encoder.build(ENCODERS)
        self.decoder = config.decoder.build(DECODERS)
        self.head = config.head.build(HEADS)
        self.proj_in = mlp_connector(self.encoder.embed_dim, hidden, hidden)
        self.proj_out = mlp_connector(hidden, hidden, self.encoder.embed_dim)
        self.understanding_encoder = None
        self.understanding_proj_in = None
        if config.understanding_encoder is not None:
            self.understanding_encoder = config.understanding_encoder.build(ENCODERS)
            understanding_input_kind(self.understanding_encoder, config.token_dim)
            self.understanding_proj_in = mlp_connector(self.understanding_encoder.hidden_size, hidden, hidden)

    @property
    def harmon(self) -> HarmonConfig:
        """The typed :class:`HarmonConfig` this core was built from."""
        return HarmonConfig.model_validate(self.config.harmon_config)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError("HarmonCore is a container; call HarmonModel / HarmonPipeline instead")
