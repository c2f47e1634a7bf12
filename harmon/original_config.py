"""The original release's model configuration, read as data, and its mapping to :class:`~harmon.configs.HarmonConfig`.

A user of the original release (wusize/Harmon) has an mmengine Python config such as
``configs/models/qwen2_5_1_5b_kl16_mar_h.py``::

    model = dict(type=Harmon, tokenizer=tokenizer, prompt_template=prompt_template,
                 vae=dict(type=AutoencoderKL, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ckpt_path='checkpoints/kl16.ckpt'),
                 vae_scale=0.2325,
                 llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=llm_name_or_path, ...),
                 mar=dict(type=mar_huge, img_size=256, vae_stride=16, ..., grad_checkpointing=True))

:func:`read_original_config` reads such a file **without executing it**: the module is parsed with :mod:`ast` and
only its top-level assignments are evaluated, as literals (numbers, strings, tuples, lists, dicts, ``dict(...)``).
Names that are not assigned in the file (``mar_huge``, ``AutoencoderKL``, ``torch.bfloat16``,
``PROMPT_TEMPLATE.qwen_chat``) are read as their dotted names; other calls (``partial(nn.LayerNorm, eps=1e-6)``) as
:class:`ConfigCall`. The JSON form (``original_config.json``) holds the same ``model`` dict (``type`` optional).

Both forms are validated by :class:`OriginalHarmonConfig` (pydantic, every argument of the original constructors
under its original name; numbers strict: ``"two"`` or ``2.7`` for a depth is an error naming the field).
mmengine is not used: it would execute the file (and import the original code base) to read it.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from harmon.configs import PromptTemplate

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict float: ints are accepted, strings and bools are not
Bool = Annotated[bool, Strict()]


class OriginalConfigError(ValueError):
    """The original config cannot be read or does not describe a model this library can build (names the key)."""


@dataclass(frozen=True)
class ConfigCall:
    """A call in a Python config other than ``dict(...)``, kept as data (never executed)."""

    func: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


# --- reading the Python form without executing it ------------------------------------------------------------------
def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class _LiteralReader:
    """Evaluates the expressions of a config module as data: literals, containers, ``dict(...)``, names."""

    def __init__(self, path: Path):
        self.path = path
        self.names: dict[str, Any] = {}

    def fail(self, node: ast.AST, what: str) -> OriginalConfigError:
        return OriginalConfigError(f"{self.path}:{getattr(node, 'lineno', '?')}: {what} (the config is read, not run)")

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.value(item) for item in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            if any(key is None for key in node.keys):
                raise self.fail(node, "'**' inside a dict literal is not supported")
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.value(node.operand)
            if isinstance(operand, (int, float)) and not isinstance(operand, bool):
                return -operand if isinstance(node.op, ast.USub) else operand
            raise self.fail(node, "a sign in front of something that is not a number")
        if isinstance(node, ast.Name) and node.id in self.names:
            return self.names[node.id]
        dotted = _dotted(node)
        if dotted is not None:
            return dotted  # an imported or otherwise external name: read as its name
        if isinstance(node, ast.Call):
            func = _dotted(node.func)
            if func is None:
                raise self.fail(node, "a call whose function is not a name")
            if any(kw.arg is None for kw in node.keywords):
                raise self.fail(node, f"'**' in the call to {func}")
            kwargs = {kw.arg: self.value(kw.value) for kw in node.keywords}
            if func == "dict" and not node.args:
                return kwargs
            return ConfigCall(func, tuple(self.value(a) for a in node.args), kwargs)
        raise self.fail(node, f"an expression of kind {type(node).__name__} cannot be read as data")

    def module(self, tree: ast.Module) -> dict[str, Any]:
        for statement in tree.body:
            if isinstance(statement, (ast.Import, ast.ImportFrom, ast.Expr)):
                continue  # imports only bind names, which are read as names; docstrings
            if isinstance(statement, ast.With):
                raise self.fail(statement, "config inheritance (with read_base(): ...) is not supported; "
                                           "give the file that defines `model`")
            if isinstance(statement, (ast.Assign, ast.AnnAssign)):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                if statement.value is None or not all(isinstance(t, ast.Name) for t in targets):
                    raise self.fail(statement, "only plain `name = value` assignments are supported")
                value = self.value(statement.value)
                for target in targets:
                    self.names[target.id] = value
                continue
            raise self.fail(statement, f"a {type(statement).__name__} statement is not supported")
        if "_base_" in self.names:
            raise self.fail(tree, "config inheritance (_base_) is not supported; give the file that defines `model`")
        return self.names


def read_python_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` dict of an mmengine Python config, read without executing the file."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as error:
        raise OriginalConfigError(f"{path}: not a Python config: {error}") from error
    names = _LiteralReader(path).module(tree)
    if "model" not in names:
        raise OriginalConfigError(f"{path}: defines no `model = dict(...)`")
    model = names["model"]
    if not isinstance(model, dict):
        raise OriginalConfigError(f"{path}: `model` is not a dict(...)")
    return model


# --- the original constructors' arguments, validated ----------------------------------------------------------------
# the original factories (src/models/mar/mar.py): encoder and decoder width × blocks × heads, mlp_ratio 4, LayerNorm
# eps 1e-6; every other MAR argument comes from the config dict
MAR_FACTORIES: dict[str, dict[str, Any]] = {
    name: dict(encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=heads,
               decoder_embed_dim=dim, decoder_depth=depth, decoder_num_heads=heads, mlp_ratio=4.0)
    for name, (dim, depth, heads) in {
        "mar_base": (768, 12, 12), "mar_large": (1024, 16, 16), "mar_huge": (1280, 20, 16),
    }.items()
}
_FACTORY_EPS = 1e-6
# xtuner's PROMPT_TEMPLATE.qwen_chat: the values of harmon.configs.PromptTemplate's defaults
KNOWN_PROMPT_TEMPLATES = ("PROMPT_TEMPLATE.qwen_chat",)


def _last_name(value: Any) -> Any:
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else value


def _class_named(value: Any, expected: str, what: str) -> str | None:
    """A ``type=`` entry that must name the original class ``expected`` (any module path)."""
    if value is not None and _last_name(value) != expected:
        raise ValueError(f"{what} must be the original {expected}, got {value!r}")
    return _last_name(value)


def _layer_norm_eps(value: Any) -> float:
    """``norm_layer`` as the original passes it → its LayerNorm eps (``nn.LayerNorm`` → 1e-5,
    ``partial(nn.LayerNorm, eps=...)``, or ``{"type": "LayerNorm", "eps": ...}`` in JSON)."""
    if isinstance(value, str) and _last_name(value) == "LayerNorm":
        return 1e-5
    if isinstance(value, ConfigCall) and _last_name(value.func) == "partial" and len(value.args) == 1 \
            and _last_name(value.args[0]) == "LayerNorm" and set(value.kwargs) <= {"eps"}:
        return float(value.kwargs.get("eps", 1e-5))
    if isinstance(value, dict) and _last_name(value.get("type")) == "LayerNorm" and set(value) <= {"type", "eps"}:
        return float(value.get("eps", 1e-5))
    raise ValueError(f"norm_layer must be a LayerNorm (nn.LayerNorm, partial(nn.LayerNorm, eps=...) or "
                     f'{{"type": "LayerNorm", "eps": ...}}), got {value!r}')


class OriginalMARConfig(BaseModel):
    """Every argument of the original ``MAR.__init__`` (wusize/Harmon ``src/models/mar/mar.py``, as LTH14/mar),
    under its original name and with its original default, plus ``type`` (``mar_base``/``mar_large``/``mar_huge``:
    the factories, which fix the widths, depths, heads, ``mlp_ratio`` and ``norm_layer``; or ``MAR`` / absent).

    Accepted and ignored on purpose (they do not change the inference model): ``label_drop_prob`` and ``class_num``
    (MAR's ImageNet class embedding, unused by Harmon: ``mar.class_emb.weight`` is dropped at conversion) and
    ``grad_checkpointing`` (training memory only). ``mask_ratio_min``, the dropouts and ``diffusion_batch_mul`` only
    matter for training; they are kept in the converted config for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    img_size: Int = Field(256, gt=0)
    vae_stride: Int = Field(16, gt=0)
    patch_size: Int = Field(1, gt=0)
    encoder_embed_dim: Int = Field(1024, gt=0)
    encoder_depth: Int = Field(16, gt=0)
    encoder_num_heads: Int = Field(16, gt=0)
    decoder_embed_dim: Int = Field(1024, gt=0)
    decoder_depth: Int = Field(16, gt=0)
    decoder_num_heads: Int = Field(16, gt=0)
    mlp_ratio: Float = Field(4.0, gt=0)
    # None: as the released factories and the public fixture's JSON, LayerNorm eps 1e-6
    norm_layer: Any = None
    vae_embed_dim: Int = Field(16, gt=0)
    mask_ratio_min: Float = Field(0.7, gt=0, le=1)
    label_drop_prob: Float = Field(0.1, ge=0, le=1)  # ignored: class-label dropout of MAR's ImageNet training
    class_num: Int = Field(1000, gt=0)  # ignored: size of the unused class embedding
    attn_dropout: Float = Field(0.1, ge=0, lt=1)
    proj_dropout: Float = Field(0.1, ge=0, lt=1)
    buffer_size: Int = Field(64, ge=0)
    diffloss_d: Int = Field(3, gt=0)
    diffloss_w: Int = Field(1024, gt=0)
    num_sampling_steps: Int | str = "100"  # a string in the original (respacing spec); digits only here
    diffusion_batch_mul: Int = Field(4, gt=0)
    grad_checkpointing: Bool = False  # ignored: activation checkpointing while training

    @field_validator("type", mode="before")
    @classmethod
    def _factory_name(cls, value: Any) -> Any:
        name = _last_name(value)
        if name is not None and name not in (*MAR_FACTORIES, "MAR"):
            raise ValueError(f"unknown MAR constructor {value!r}; known: {', '.join([*MAR_FACTORIES, 'MAR'])}")
        return name

    @field_validator("num_sampling_steps")
    @classmethod
    def _steps(cls, value: int | str) -> int | str:
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError(f"num_sampling_steps must be a number of steps such as '100', got {value!r}")
        if int(value) <= 0:
            raise ValueError(f"num_sampling_steps must be positive, got {value!r}")
        return value

    @field_validator("norm_layer")
    @classmethod
    def _norm_layer(cls, value: Any) -> Any:
        if value is not None and _layer_norm_eps(value) != _FACTORY_EPS:
            # the original's z_proj_ln is always eps 1e-6 while its blocks take norm_layer; this library's MAR has
            # one eps for both, so only the released factories' 1e-6 converts exactly
            raise ValueError(f"LayerNorm eps {_layer_norm_eps(value)} is not supported (only 1e-6, as mar_base / "
                             "mar_large / mar_huge; type=MAR without norm_layer means MAR.__init__'s nn.LayerNorm, "
                             "eps 1e-5)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _factory_fixes_its_arguments(cls, data: Any) -> Any:
        if isinstance(data, dict) and _last_name(data.get("type")) == "MAR" and "norm_layer" not in data:
            return {**data, "norm_layer": "nn.LayerNorm"}  # MAR.__init__'s own default (eps 1e-5), stated
        if not isinstance(data, dict) or _last_name(data.get("type")) not in MAR_FACTORIES:
            return data
        name = _last_name(data["type"])
        fixed = sorted(set(data) & {*MAR_FACTORIES[name], "norm_layer"})
        if fixed:  # the original would fail too: "got multiple values for keyword argument"
            raise ValueError(f"{name} fixes {', '.join(fixed)}; remove them from the mar dict or use type=MAR")
        return {**data, **MAR_FACTORIES[name], "norm_layer": ConfigCall("partial", ("nn.LayerNorm",),
                                                                       {"eps": _FACTORY_EPS})}

    @property
    def norm_eps(self) -> float:
        return _FACTORY_EPS if self.norm_layer is None else _layer_norm_eps(self.norm_layer)


class OriginalVAEConfig(BaseModel):
    """The original ``AutoencoderKL(embed_dim, ch_mult, use_variational=True, ckpt_path=None)`` (MAR's
    ``models/vae.py``), plus the sizes its inner ``Encoder``/``Decoder`` fix (``ch`` = 128, ``num_res_blocks`` = 2,
    ``attn_resolutions`` = (16,), ``resolution`` = 256, 3 channels in and out), which a config may state (the public
    fixture's JSON states ``ch`` for its small stand-in VAE). Unstated ``ch`` / ``num_res_blocks`` are read from
    the checkpoint's tensor shapes (:func:`vae_sizes_from_state_dict`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    embed_dim: Int = Field(gt=0)
    ch_mult: tuple[Int, ...]
    # False: quant_conv maps to embed_dim channels and the posterior's log-variance is the constant 1; converted
    # exactly into the variational layout (see variational_quant_conv)
    use_variational: Bool = True
    ckpt_path: str | None = None  # the VAE checkpoint when `harmon convert --vae` is not given
    ch: Int | None = Field(None, gt=0)
    num_res_blocks: Int | None = Field(None, gt=0)
    attn_resolutions: tuple[Int, ...] | None = None
    resolution: Int | None = Field(None, gt=0)
    in_channels: Int | None = Field(None, gt=0)
    out_channels: Int | None = Field(None, gt=0)

    @field_validator("type", mode="before")
    @classmethod
    def _vae_class(cls, value: Any) -> Any:
        return _class_named(value, "AutoencoderKL", "the VAE")



class OriginalLLMConfig(BaseModel):
    """The ``llm`` dict: ``AutoModelForCausalLM.from_pretrained`` and the arguments the release passes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    pretrained_model_name_or_path: str | None = None  # the LLM folder when `harmon convert --llm` is not given
    # ignored: the conversion keeps float32 (`--dtype` / `.to(dtype=)` choose) and resolves the attention itself
    torch_dtype: Any = None
    attn_implementation: str | None = None
    trust_remote_code: Bool | None = None


class OriginalTokenizerConfig(BaseModel):
    """The ``tokenizer`` dict (``AutoTokenizer.from_pretrained``). Ignored: the tokenizer is read from the LLM
    folder, which the release names with the same ``llm_name_or_path``; right padding is what the pipeline does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    pretrained_model_name_or_path: str | None = None
    trust_remote_code: Bool | None = None
    padding_side: Literal["right", "left"] | None = None


class OriginalHarmonConfig(BaseModel):
    """The original ``Harmon(vae, vae_scale, llm, mar, tokenizer, prompt_template)`` model dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    mar: OriginalMARConfig
    vae: OriginalVAEConfig
    vae_scale: Float = Field(0.2325, gt=0)
    llm: OriginalLLMConfig | None = None
    tokenizer: OriginalTokenizerConfig | None = None
    prompt_template: PromptTemplate | None = None  # None: xtuner's qwen_chat, the library's default

    @field_validator("type", mode="before")
    @classmethod
    def _harmon_class(cls, value: Any) -> Any:
        return _class_named(value, "Harmon", "the model")

    @field_validator("prompt_template", mode="before")
    @classmethod
    def _template(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in KNOWN_PROMPT_TEMPLATES:
                raise ValueError(f"unknown prompt template {value!r}; known: {', '.join(KNOWN_PROMPT_TEMPLATES)} "
                                 "(or give its SYSTEM / INSTRUCTION / ... dict)")
            return None  # qwen_chat: the library's defaults
        return value


_SECTIONS = {"mar": "the MAR constructor arguments", "vae": "the AutoencoderKL arguments"}
_CONSTRUCTORS = {"": "Harmon model dict", "mar": "MAR.__init__", "vae": "AutoencoderKL",
                 "llm": "llm dict (AutoModelForCausalLM.from_pretrained)",
                 "tokenizer": "tokenizer dict (AutoTokenizer.from_pretrained)"}


def _explain(error: ValidationError, source: str) -> OriginalConfigError:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "missing" and where in _SECTIONS:
            lines.append(f"no '{where}' section ({_SECTIONS[where]})")
        elif item["type"] == "missing":
            lines.append(f"{where}: missing")
        elif item["type"] == "extra_forbidden":
            section = str(item["loc"][0]) if len(item["loc"]) > 1 else ""
            lines.append(f"{where}: not an argument of the original {_CONSTRUCTORS.get(section, 'constructor')}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            scalar = "input" in item and not isinstance(item["input"], (dict, list, tuple))
            lines.append(f"{where}: {message} (got {item['input']!r})" if scalar else f"{where}: {message}")
    return OriginalConfigError(f"original config {source}: " + "; ".join(lines))


@dataclass(frozen=True)
class OriginalConfig:
    """A validated original config and where it was read from (relative paths in it resolve against ``folder``)."""

    model: OriginalHarmonConfig
    source: str
    folder: Path | None


def read_original_config(original_config: str | os.PathLike | dict[str, Any] | OriginalConfig) -> OriginalConfig:
    """An original config from a ``.py`` mmengine config (read, not run), a ``.json`` file or a dict."""
    if isinstance(original_config, OriginalConfig):
        return original_config
    if isinstance(original_config, dict):
        data, source, folder = original_config, "(dict)", None
    else:
        path = Path(original_config)
        if not path.is_file():
            raise FileNotFoundError(f"original config not found: {path}")
        source, folder = str(path), path.absolute().parent  # as the user laid it out (links not followed)
        if path.suffix == ".py":
            data = read_python_config(path)
        else:
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise OriginalConfigError(f"{path}: not a JSON original config ({error}); "
                                          "a Python config must end in .py") from error
            if not isinstance(data, dict):
                raise OriginalConfigError(f"{path}: expected a JSON object (the model dict)")
    try:
        return OriginalConfig(OriginalHarmonConfig.model_validate(data), source, folder)
    except ValidationError as error:
        raise _explain(error, source) from None


# --- what the config names: the VAE checkpoint and the LLM folder ---------------------------------------------------
def resolve_named_path(name: str, config: OriginalConfig, what: str, folder_expected: bool) -> Path:
    """A path named in the config: absolute, else relative to the config file's folder, else to the working
    directory (the original runs from its repository root). A name found nowhere raises naming the places tried;
    for an LLM, a hub id (``org/name``) offline fails with the hub hint."""
    candidates = [Path(name)] if Path(name).is_absolute() else \
        [*([config.folder / name] if config.folder is not None else []), Path.cwd() / name]
    for candidate in candidates:
        if (candidate.is_dir() if folder_expected else candidate.is_file()):
            return candidate
    if folder_expected:
        from harmon.encoders.common import fail_fast_for_hub_id

        hint = (f"Conversion reads local files only: download {name} (e.g. `huggingface-cli download {name} "
                "--local-dir <folder>`) and pass `--llm <folder>` (llm_folder= in Python).")
        fail_fast_for_hub_id(name, f"{what} (from {config.source})", hint)
        raise FileNotFoundError(f"{what} {name!r} (from {config.source}) is not a local folder. {hint}")
    raise FileNotFoundError(f"{what} {name!r} named in {config.source} not found; tried "
                            + ", ".join(str(c) for c in candidates))


def vae_sizes_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The VAE sizes the original constructor fixes internally, read from an LDM-layout state dict:
    ``ch`` (``encoder.conv_in`` output channels) and ``num_res_blocks`` (blocks of the first encoder level)."""
    sizes: dict[str, int] = {}
    conv_in = state_dict.get("encoder.conv_in.weight")
    if conv_in is not None:
        sizes["ch"] = int(conv_in.shape[0])
    blocks = {key.split(".")[4] for key in state_dict if key.startswith("encoder.down.0.block.")}
    if blocks:
        sizes["num_res_blocks"] = len(blocks)
    return sizes


def variational_quant_conv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A non-variational original VAE (``use_variational=False``) in the variational layout, exactly.

    The original's ``quant_conv`` then outputs the mean only (``embed_dim`` channels) and ``encode`` appends a
    constant log-variance of ones. The same function as a variational ``quant_conv`` (``2·embed_dim`` outputs): the
    mean rows as given, then zero weights with bias 1 for the log-variance rows. Other tensors are passed through."""
    weight, bias = state_dict["quant_conv.weight"], state_dict["quant_conv.bias"]
    if weight.shape[0] * 2 != weight.shape[1]:
        raise ValueError(f"use_variational=False expects quant_conv.weight of shape (embed_dim, 2*embed_dim, 1, 1), "
                         f"got {tuple(weight.shape)}")
    out = dict(state_dict)
    out["quant_conv.weight"] = torch.cat([weight, torch.zeros_like(weight)])
    out["quant_conv.bias"] = torch.cat([bias, torch.ones_like(bias)])
    return out


def kl_autoencoder_fields(vae: OriginalVAEConfig, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The :class:`~harmon.encoders.vae.KLAutoencoderConfig` fields of an original ``vae`` dict: those it states,
    then sizes read from the checkpoint's ``state_dict`` (when given); the rest keep the released kl16's values."""
    fields = {k: v for k, v in vae.model_dump(exclude={"type", "use_variational", "ckpt_path"}).items()
              if v is not None}
    for key, value in vae_sizes_from_state_dict(state_dict or {}).items():
        fields.setdefault(key, value)
    return fields


def to_harmon_config(config: OriginalConfig | OriginalHarmonConfig, llm_config: Any | None = None,
                     vae_state_dict: dict[str, torch.Tensor] | None = None):
    """The :class:`~harmon.configs.HarmonConfig` of an original config (and the LLM's transformers config for the
    backbone shape; the VAE checkpoint's state dict for sizes the config does not state)."""
    from harmon.configs import ComponentSpec, HarmonConfig, qwen_fields_from_transformers
    from harmon.encoders.vae import KLAutoencoderConfig

    original = config.model if isinstance(config, OriginalConfig) else config
    mar = original.mar
    grid = mar.img_size // mar.vae_stride // mar.patch_size
    common = dict(mlp_ratio=float(mar.mlp_ratio), attn_dropout=float(mar.attn_dropout),
                  proj_dropout=float(mar.proj_dropout), buffer_size=mar.buffer_size, base_grid=(grid, grid),
                  norm_eps=mar.norm_eps)
    token_dim = mar.vae_embed_dim * mar.patch_size**2
    data: dict[str, Any] = dict(
        encoder=ComponentSpec(name="mar", config=dict(
            token_dim=token_dim, embed_dim=mar.encoder_embed_dim, depth=mar.encoder_depth,
            num_heads=mar.encoder_num_heads, **common)),
        decoder=ComponentSpec(name="mar", config=dict(
            encoder_dim=mar.encoder_embed_dim, embed_dim=mar.decoder_embed_dim, depth=mar.decoder_depth,
            num_heads=mar.decoder_num_heads, **common)),
        head=ComponentSpec(name="mlp-adaln", config=dict(
            token_dim=token_dim, cond_dim=mar.decoder_embed_dim, width=mar.diffloss_w, depth=mar.diffloss_d,
            num_sampling_steps=int(mar.num_sampling_steps), diffusion_batch_mul=mar.diffusion_batch_mul)),
        vae=KLAutoencoderConfig(**kl_autoencoder_fields(original.vae, vae_state_dict)),
        vae_scale=float(original.vae_scale),
        vae_stride=mar.vae_stride,
        patch_size=mar.patch_size,
        image_size=mar.img_size,
        mask_ratio_min=float(mar.mask_ratio_min),
    )
    if original.prompt_template is not None:
        data["prompt_template"] = original.prompt_template
    if llm_config is not None:
        data["backbone"] = ComponentSpec(name="qwen2", config=qwen_fields_from_transformers(llm_config))
    return HarmonConfig(**data)


__all__ = [
    "ConfigCall",
    "MAR_FACTORIES",
    "OriginalConfig",
    "OriginalConfigError",
    "OriginalHarmonConfig",
    "OriginalMARConfig",
    "OriginalVAEConfig",
    "read_original_config",
    "read_python_config",
    "resolve_named_path",
    "variational_quant_conv",
    "to_harmon_config",
    "kl_autoencoder_fields",
    "vae_sizes_from_state_dict",
]
