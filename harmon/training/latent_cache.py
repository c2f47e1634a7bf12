"""The frozen VAE's tokens of training images, computed once per image and reused (``training.latent_cache_size``).

Exact, not an approximation: the VAE never trains, runs in eval mode and encodes the posterior mode
(:func:`harmon.latents.vae_encode`), and the data's preprocessing (:mod:`harmon.training.data`) is deterministic,
so an image's tokens are the same every time it is drawn. The only difference is float round-off: an image first
seen next to other images is encoded in a smaller batch than its micro-batch. Written here because diffusers'
training scripts precompute latents inside their own loops (``--cache_latents``), with no class to reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch


class LatentCache:
    """Up to ``capacity`` images' VAE tokens, keyed by the dataset's ``image_key`` of each sample.

    When it is full, the images not in it are encoded on every draw, as without a cache; nothing is evicted."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"latent_cache_size: {capacity}; a cache needs room for at least one image (0: no cache)")
        self.capacity = capacity
        self._tokens: dict[Hashable, torch.Tensor] = {}
        self.encoded = 0  # images encoded through the cache (first draws, and every draw once it is full)

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(
        self, encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, keys: Sequence[Hashable]
    ) -> torch.Tensor:
        """``encode(pixels)`` — the rows of ``keys`` already cached are taken from the cache, the others are
        encoded in one call (and kept while there is room)."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"image_keys: {len(keys)} keys for a batch of {pixels.shape[0]} images")
        rows: list[torch.Tensor | None] = [self._tokens.get(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = encode(pixels[missing]).detach()
            self.encoded += len(missing)
            for j, i in enumerate(missing):
                rows[i] = fresh[j]
                if len(self._tokens) < self.capacity and keys[i] not in self._tokens:
                    self._tokens[keys[i]] = fresh[j]
        return torch.stack(rows)  # type: ignore[arg-type]
