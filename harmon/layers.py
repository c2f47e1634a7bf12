"""Small building blocks shared by several component families."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Annotated

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, Strict, model_validator
from timm.models.vision_transformer import Block
from torch import nn


class MARStackConfig(BaseModel):
    """Fields shared by the MAR encoder and decoder: a ViT stack with buffer slots and a learned grid embedding."""

    # strict: "12" or 12.0 for a width is refused, not coerced (as the Qwen backbone's config does); a tuple field
    # takes a JSON list (Strict(False) on the container only: its items stay strict)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    embed_dim: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: float = Field(4.0, gt=0)
    buffer_size: NonNegativeInt = 64
    base_grid: Annotated[tuple[PositiveInt, PositiveInt], Strict(False)] = (16, 16)
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    proj_dropout: float = Field(0.1, ge=0, lt=1)
    norm_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        return self


def vit_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, attn_dropout: float, proj_dropout: float, norm_eps: float
) -> nn.ModuleList:
    """``depth`` timm ViT blocks as MAR builds them (qkv bias, LayerNorm with ``norm_eps``)."""
    norm_layer = partial(nn.LayerNorm, eps=norm_eps)
    return nn.ModuleList(
        Block(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_layer=norm_layer,
            proj_drop=proj_dropout,
            attn_drop=attn_dropout,
        )
        for _ in range(depth)
    )


@contextlib.contextmanager
def live_weights(module: nn.Module, device: torch.device):
    """A context in which ``module``'s parameters (recursively) are real tensors on ``device``, for code that reads
    them directly instead of calling the module: a no-op normally; under accelerate's sequential offload (weights
    on the meta device between forwards) accelerate's ``align_module_device`` brings each submodule's in for the
    block (it handles one module's own tensors, hence the stack)."""
    offloaded = [m for m in module.modules() if hasattr(m, "_hf_hook")]
    if not offloaded:
        yield
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for sub in offloaded:
            if has_offloaded_params(sub):
                stack.enter_context(align_module_device(sub, device))
        yield


def vit_block_at(block: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """A timm ViT ``block`` evaluated at some positions only: ``x (B, N, D)``, ``index (B, P)`` → the rows
    ``block(x)[b, index[b]]`` as ``(B, P, D)``, equal to them to float round-off.

    Keys and values still come from all ``N`` positions (attention needs them); the queries, the attention
    output, the projection, the residuals and the MLP are computed for the ``P`` chosen positions only. At the
    last block of a stack whose output is read at a few positions (the MAR decoder during sampling: a handful of
    the ``K + m·n`` positions per step) that skips most of the block's work. Hand-written because timm's
    ``Block.forward`` has no notion of query positions; it reuses the block's own submodules, so weights and
    options (qk-norm, layer scale, a gated attention) are the block's. Returns ``None`` for what it cannot
    reproduce exactly (not a timm ``Block``/``Attention``, or in training mode, where dropout and drop-path
    act): the caller then runs the whole block."""
    from timm.layers import Attention

    attn = getattr(block, "attn", None)
    if type(block) is not Block or type(attn) is not Attention or block.training:
        return None
    batch, length, dim = x.shape
    count = index.shape[1]
    heads, head_dim, attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
    h = block.norm1(x)
    where = index[..., None].expand(-1, -1, dim)
    h_at, x_at = h.gather(1, where), x.gather(1, where)
    with live_weights(attn.qkv, x.device):  # the projection's weights are read directly, split into q and kv
        w_q, w_kv = attn.qkv.weight.split([attn_dim, 2 * attn_dim])
        b_q, b_kv = attn.qkv.bias.split([attn_dim, 2 * attn_dim]) if attn.qkv.bias is not None else (None, None)
        q = F.linear(h_at, w_q, b_q).view(batch, count, heads, head_dim).transpose(1, 2)
        k, v = F.linear(h, w_kv, b_kv).view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(batch, count, attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h_at).sigmoid()
    x_at = x_at + block.ls1(attn.proj(out))
    return x_at + block.ls2(block.mlp(block.norm2(x_at)))


def grid_position_embedding(
    learned: torch.Tensor, prefix_len: int, base_grid: tuple[int, int], image_shape: tuple[int, int]
) -> torch.Tensor:
    """Learned position embedding ``(1, prefix_len + m0·n0, D)`` resized to the grid ``image_shape = (m, n)``.

    The first ``prefix_len`` rows (buffer slots) are kept as they are; the grid part is bilinearly interpolated
    (``align_corners=False``) when ``(m, n)`` differs from the grid it was learned on, ``base_grid = (m0, n0)``.
    """
    m, n = image_shape
    if (m, n) == tuple(base_grid):
        return learned
    grid = rearrange(learned[:, prefix_len:], "b (h w) c -> b c h w", h=base_grid[0], w=base_grid[1])
    grid = F.interpolate(grid.float(), size=(m, n), mode="bilinear", align_corners=False).to(learned.dtype)
    grid = rearrange(grid, "b c h w -> b (h w) c")
    return torch.cat([learned[:, :prefix_len], grid], dim=1)


def mlp_connector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear · SiLU · Linear, the ``proj_in`` / ``proj_out`` connector between the MAR encoder and the LLM."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


def init_mar_weights(module: nn.Module) -> None:
    """MAR's initialisation: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def masked_row_count(mask: torch.Tensor) -> int:
    """Number of masked tokens per row; every row of ``mask (B, L)`` must hide the same number."""
    counts = mask.to(torch.bool).sum(dim=-1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"every row of the mask must hide the same number of tokens, got {counts.tolist()}")
    return int(counts[0]) if counts.numel() else 0
