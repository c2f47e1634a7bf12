"""Configuration of a whole Harmon model, and the named presets.

A :class:`HarmonConfig` names one registered component per role (``ComponentSpec``: registry name + config
overrides, validated against that component's own pydantic config at construction) plus the VAE and the
model-level settings. ``understanding_encoder`` is ``None`` for Harmon's shared design (the generation encoder also
serves understanding) or names a decoupled understanding encoder (e.g. ``siglip-base-patch16-256``, Janus-like).
Presets are data: ``harmon-0.5b``, ``harmon-1.5b``, ``tiny``, and the decoupled ``harmon-0.5b-siglip``,
``tiny-siglip``.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_core import to_jsonable_python

from harmon.encoders.vae import KLAutoencoderConfig
from harmon.registry import BACKBONES, DECODERS, ENCODERS, HEADS, Registry

# importing the families registers them
import harmon.backbones.qwen  # noqa: E402,F401
import harmon.decoders.mar  # noqa: E402,F401
import harmon.encoders.mar  # noqa: E402,F401
import harmon.encoders.siglip  # noqa: E402,F401
import harmon.encoders.vqgan  # noqa: E402,F401
import harmon.heads.diffusion  # noqa: E402,F401


class ComponentSpec(BaseModel):
    """A registered component by name, with overrides of its default config values (the architecture), and
    optionally where its pretrained weights are.

    ``pretrained`` is not architecture: it is never saved (``model_dump`` leaves it out, so a saved model's or
    pipeline's config names no file on the saver's machine) and :meth:`build` never reads it. It is the separate
    step after building, :meth:`load_pretrained` (:meth:`HarmonModel.from_config <harmon.model.HarmonModel.from_config>`
    calls it for every role). Older saved configs wrote it inside ``config`` (``config: {pretrained: …}``): that
    spelling is still read, moved here (and ignored when a saved folder is loaded: its weights are in the folder).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = Field(
        None, exclude=True,
        description="weights loaded after building (registry.load_pretrained): the component's released format "
        "(a transformers folder, a taming / LDM checkpoint) or a strict state dict file; never saved",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained_out_of_the_architecture(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        config = data.get("config")
        if isinstance(config, dict) and "pretrained" in config:  # the older spelling, inside the architecture
            config = dict(config)
            legacy, given = config.pop("pretrained"), data.get("pretrained")
            if given is not None and legacy is not None and os.fspath(legacy) != os.fspath(given):
                raise ValueError(f"pretrained is given twice ({given!r} and config.pretrained {legacy!r})")
            data["config"] = config
            data["pretrained"] = given if given is not None else legacy
        if isinstance(data.get("pretrained"), os.PathLike):
            data["pretrained"] = os.fspath(data["pretrained"])
        return data

    @field_validator("config")
    @classmethod
    def _json_form(cls, value: dict[str, Any]) -> dict[str, Any]:
        # kept in its JSON form (tuples as lists) so that a spec equals itself after a save / load
        return to_jsonable_python(value)

    def resolve(self, registry: Registry) -> BaseModel | None:
        """The component's validated config (unknown name / bad field → a clear error)."""
        return registry.get(self.name).build_config(**self.config)

    def build(self, registry: Registry):
        """The component, randomly initialised: construction reads no weight file (see :meth:`load_pretrained`)."""
        return registry.create(self.name, **self.config)

    def load_pretrained(self, component: Any, registry: Registry) -> Any:
        """Load ``pretrained`` into ``component``, built by :meth:`build` from ``registry`` (strict; errors name the
        file and the keys); a no-op when this spec names no weights."""
        if self.pretrained is not None:
            registry.load_pretrained(self.name, component, self.pretrained)
        return component

    def architecture(self) -> "ComponentSpec":
        """This spec without ``pretrained`` (what a saved config holds)."""
        return self.model_copy(update={"pretrained": None})


class PromptTemplate(BaseModel):
    """Qwen chat template pieces, as the original config stores them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    system: str = Field("<|im_start|>system\n{system}<|im_end|>\n", alias="SYSTEM")
    instruction: str = Field("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", alias="INSTRUCTION")
    suffix: str = Field("<|im_end|>", alias="SUFFIX")
    suffix_as_eos: bool = Field(True, alias="SUFFIX_AS_EOS")
    sep: str = Field("\n", alias="SEP")
    stop_words: tuple[str, ...] = Field(("<|im_end|>", "<|endoftext|>"), alias="STOP_WORDS")


class HarmonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # vae_scale=inf is no scale

    encoder: ComponentSpec = ComponentSpec(name="mar-b")
    # None: shared (the generation encoder serves understanding too, the paper's design); else a decoupled
    # understanding encoder with its own proj_in: a pixel encoder (SigLIP, VQGAN, the KL VAE, a plugin) or a
    # second token encoder (MAR) reading the model's VAE tokens
    understanding_encoder: ComponentSpec | None = None
    decoder: ComponentSpec = ComponentSpec(name="mar-b")
    head: ComponentSpec = ComponentSpec(name="mlp-adaln-b")
    backbone: ComponentSpec = ComponentSpec(name="qwen2.5-0.5b-instruct")
    vae: KLAutoencoderConfig = KLAutoencoderConfig()
    vae_scale: float = Field(0.2325, gt=0)
    vae_stride: PositiveInt = 16
    patch_size: PositiveInt = 1
    image_size: PositiveInt = 256
    # understanding images' default square side on the token path (None: image_size); the MAR encoder interpolates
    # its position embeddings to the larger grid. The release's scripts describe images at 512 with Harmon-1.5B.
    understanding_image_size: PositiveInt | None = None
    mask_ratio_min: float = Field(0.7, gt=0, le=1)
    visual_grad_scale: float = Field(0.1, ge=0)
    unconditional_prompt: str = "Generate an image."
    generation_prefix: str = "Generate an image: "
    prompt_template: PromptTemplate = PromptTemplate()

    @model_validator(mode="after")
    def _components_fit_together(self) -> "HarmonConfig":
        encoder = self.encoder.resolve(ENCODERS)
        decoder = self.decoder.resolve(DECODERS)
        head = self.head.resolve(HEADS)
        self.backbone.resolve(BACKBONES)
        problems = []
        token_dim = self.vae.embed_dim * self.patch_size**2
        if self.image_size % (self.vae_stride * self.patch_size):
            problems.append(f"image_size {self.image_size} is not a multiple of vae_stride·patch_size")
        if self.understanding_image_size and self.understanding_image_size % (self.vae_stride * self.patch_size):
            problems.append(
                f"understanding_image_size {self.understanding_image_size} is not a multiple of vae_stride·patch_size"
            )
        grid = self.image_size // self.vae_stride // self.patch_size
        _expect(problems, "encoder.token_dim", getattr(encoder, "token_dim", token_dim), token_dim)
        _expect(problems, "head.token_dim", getattr(head, "token_dim", token_dim), token_dim)
        if hasattr(encoder, "embed_dim") and hasattr(decoder, "encoder_dim"):
            _expect(problems, "decoder.encoder_dim", decoder.encoder_dim, encoder.embed_dim)
        if hasattr(decoder, "embed_dim") and hasattr(head, "cond_dim"):
            _expect(problems, "head.cond_dim", head.cond_dim, decoder.embed_dim)
        if hasattr(encoder, "buffer_size") and hasattr(decoder, "buffer_size"):
            _expect(problems, "decoder.buffer_size", decoder.buffer_size, encoder.buffer_size)
        for role, cfg in (("encoder", encoder), ("decoder", decoder)):
            if hasattr(cfg, "base_grid"):
                _expect(problems, f"{role}.base_grid", tuple(cfg.base_grid), (grid, grid))
        if reads_pixels(self.encoder.name):
            problems.append(
                f"encoder {self.encoder.name!r} reads pixels (an understanding encoder); the generation encoder must "
                "be a token encoder such as mar-b (set it as understanding_encoder instead)"
            )
        if self.understanding_encoder is not None:
            understanding = self.understanding_encoder.resolve(ENCODERS)
            if not reads_pixels(self.understanding_encoder.name):  # a token encoder reads the model's VAE tokens
                _expect(problems, "understanding_encoder.token_dim",
                        getattr(understanding, "token_dim", token_dim), token_dim)
                if hasattr(understanding, "base_grid"):
                    _expect(problems, "understanding_encoder.base_grid", tuple(understanding.base_grid), (grid, grid))
        if problems:
            raise ValueError("components do not fit together: " + "; ".join(problems))
        return self

    @property
    def token_dim(self) -> int:
        return self.vae.embed_dim * self.patch_size**2

    @property
    def shared_encoder(self) -> bool:
        """True when the generation encoder also serves understanding (no decoupled understanding encoder)."""
        return self.understanding_encoder is None

    @property
    def latent_stride(self) -> int:
        """Pixels per latent token along each side."""
        return self.vae_stride * self.patch_size

    COMPONENT_ROLES: ClassVar[tuple[str, ...]] = ("encoder", "understanding_encoder", "decoder", "head", "backbone")
    ROLE_REGISTRIES: ClassVar[dict[str, Registry]] = {
        "encoder": ENCODERS, "understanding_encoder": ENCODERS, "decoder": DECODERS, "head": HEADS,
        "backbone": BACKBONES,
    }

    def pretrained_weights(self) -> dict[str, str]:
        """``{role: path}`` of the components whose spec names ``pretrained`` weights."""
        specs = {role: getattr(self, role) for role in self.COMPONENT_ROLES}
        return {role: spec.pretrained for role, spec in specs.items() if spec is not None and spec.pretrained}

    def architecture(self) -> "HarmonConfig":
        """This config with no ``pretrained`` weights named (what a saved model holds; equal once saved)."""
        update = {role: getattr(self, role).architecture() for role in self.pretrained_weights()}
        return self.model_copy(update=update) if update else self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "HarmonConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown Harmon preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        data = copy.deepcopy(PRESETS[name])
        data.update(overrides)
        return cls(**data)

    @classmethod
    def from_original(cls, original: Any, llm_config: Any | None = None) -> "HarmonConfig":
        """From the original model config — the release's mmengine ``.py`` config (read, not run), its JSON form
        or a dict: the ``mar`` / ``vae`` constructor arguments, ``vae_scale``, ``prompt_template``, ... (see
        :mod:`harmon.original_config`) — and the LLM's transformers config (for the backbone shape)."""
        from harmon.original_config import read_original_config, to_harmon_config

        return to_harmon_config(read_original_config(original), llm_config)


def to_original_config(config: HarmonConfig) -> dict[str, Any]:
    """The original model config (``mar`` / ``vae`` constructor arguments, ``vae_scale``, ``prompt_template``) of
    a Harmon model built from MAR-family components: the inverse of :meth:`HarmonConfig.from_original`."""
    if config.understanding_encoder is not None:
        raise ValueError(
            f"a decoupled understanding encoder ({config.understanding_encoder.name!r}) has no original config form: "
            "the original release shares its MAR encoder"
        )
    encoder = config.encoder.resolve(ENCODERS)
    decoder = config.decoder.resolve(DECODERS)
    head = config.head.resolve(HEADS)
    for role, cfg, needed in (("encoder", encoder, "depth"), ("decoder", decoder, "depth"), ("head", head, "width")):
        if not hasattr(cfg, needed):
            raise ValueError(f"the {role} is not a MAR-family component: it has no original config form")
    mar = {
        "img_size": config.image_size,
        "vae_stride": config.vae_stride,
        "patch_size": config.patch_size,
        "encoder_embed_dim": encoder.embed_dim,
        "encoder_depth": encoder.depth,
        "encoder_num_heads": encoder.num_heads,
        "decoder_embed_dim": decoder.embed_dim,
        "decoder_depth": decoder.depth,
        "decoder_num_heads": decoder.num_heads,
        "mlp_ratio": encoder.mlp_ratio,
        "vae_embed_dim": config.vae.embed_dim,
        "mask_ratio_min": config.mask_ratio_min,
        "attn_dropout": encoder.attn_dropout,
        "proj_dropout": encoder.proj_dropout,
        "buffer_size": encoder.buffer_size,
        "diffloss_d": head.depth,
        "diffloss_w": head.width,
        "num_sampling_steps": str(head.num_sampling_steps),
        "diffusion_batch_mul": head.diffusion_batch_mul,
    }
    return {
        "mar": mar,
        "vae": {"embed_dim": config.vae.embed_dim, "ch_mult": list(config.vae.ch_mult), "ch": config.vae.ch},
        "vae_scale": config.vae_scale,
        "prompt_template": config.prompt_template.model_dump(mode="json", by_alias=True),
    }


def qwen_fields_from_transformers(llm_config: Any) -> dict[str, Any]:
    """The :class:`~harmon.backbones.qwen.QwenBackboneConfig` fields of a transformers ``Qwen2Config``."""
    rope = getattr(llm_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(llm_config, "rope_theta", 1_000_000.0))
    return dict(
        vocab_size=llm_config.vocab_size,
        hidden_size=llm_config.hidden_size,
        intermediate_size=llm_config.intermediate_size,
        num_hidden_layers=llm_config.num_hidden_layers,
        num_attention_heads=llm_config.num_attention_heads,
        num_key_value_heads=llm_config.num_key_value_heads,
        max_position_embeddings=llm_config.max_position_embeddings,
        rope_theta=float(rope_theta),
        rms_norm_eps=llm_config.rms_norm_eps,
        tie_word_embeddings=bool(llm_config.tie_word_embeddings),
    )


def reads_pixels(encoder_name: str) -> bool:
    """Whether the registered encoder ``encoder_name`` is a pixel encoder (it has ``preprocess``,
    :class:`~harmon.interfaces.UnderstandingEncoder`) rather than a token encoder reading VAE tokens (MAR)."""
    return callable(getattr(ENCODERS.get(encoder_name).component, "preprocess", None))


def _expect(problems: list[str], field: str, actual: Any, expected: Any) -> None:
    if actual != expected:
        problems.append(f"{field} is {actual}, expected {expected}")


PRESETS: dict[str, dict[str, Any]] = {
    "harmon-0.5b": dict(
        encoder=ComponentSpec(name="mar-b"),
        decoder=ComponentSpec(name="mar-b"),
        head=ComponentSpec(name="mlp-adaln-b"),
        backbone=ComponentSpec(name="qwen2.5-0.5b-instruct"),
    ),
    "harmon-1.5b": dict(
        encoder=ComponentSpec(name="mar-h"),
        decoder=ComponentSpec(name="mar-h"),
        head=ComponentSpec(name="mlp-adaln-h"),
        backbone=ComponentSpec(name="qwen2.5-1.5b-instruct"),
        understanding_image_size=512,
    ),
    "tiny": dict(
        encoder=ComponentSpec(name="mar-tiny"),
        decoder=ComponentSpec(name="mar-tiny"),
        head=ComponentSpec(name="mlp-adaln-tiny"),
        backbone=ComponentSpec(name="qwen2-tiny"),
        vae=KLAutoencoderConfig(ch=32),
        image_size=64,
    ),
}
# decoupled (Janus-like): SigLIP for understanding, MAR for generation
PRESETS["harmon-0.5b-siglip"] = dict(
    PRESETS["harmon-0.5b"], understanding_encoder=ComponentSpec(name="siglip-base-patch16-256")
)
PRESETS["tiny-siglip"] = dict(PRESETS["tiny"], understanding_encoder=ComponentSpec(name="siglip-tiny"))
# harmon-toy: the small model trained offline on coloured digits (harmon.toy; weights shipped in the package).
# 64×64 images through a stride-8 KL VAE (8×8 = 64 tokens of 16 channels; why: docs/toy.md), a word-level
# 64-token vocabulary (harmon.toy.tokenizer), a 3-layer Qwen2 of width 128, MAR encoder/decoder of width 128 and
# depth 2, a 3-block MLP head of width 160: 2.3 M parameters, 4.6 MB in fp16.
_TOY_MAR = dict(embed_dim=128, depth=2, num_heads=4, buffer_size=4, base_grid=(8, 8), attn_dropout=0.0,
                proj_dropout=0.0)
PRESETS["harmon-toy"] = dict(
    encoder=ComponentSpec(name="mar", config=dict(token_dim=16, **_TOY_MAR)),
    decoder=ComponentSpec(name="mar", config=dict(encoder_dim=128, **_TOY_MAR)),
    # the full 1000-step chain for sampling: respaced to 100 steps, the first step multiplies the head's ε error at
    # t = 999 by ~10³ and the toy head's (0.2) blew the tokens up to std ≈ 400 (1000 steps: std 1.0, measured)
    head=ComponentSpec(name="mlp-adaln", config=dict(token_dim=16, cond_dim=128, width=160, depth=3,
                                                     num_sampling_steps=1000)),
    backbone=ComponentSpec(name="qwen2", config=dict(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)),
    vae=KLAutoencoderConfig(embed_dim=16, ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(),
                            resolution=64, norm_num_groups=1),
    vae_stride=8,
    image_size=64,
    # the understanding gradient into the shared MAR encoder unscaled (Harmon: 0.1). Measured on the toy, digit
    # questions alone from a random init: at 0.1 still at chance after 600 steps, at 1.0 0.42 (held-out), 0.83
    # after 2000. Harmon's encoder starts from a pretrained MAR; the toy's starts from nothing.
    visual_grad_scale=1.0,
)
