"""Random sources for the sampler: every random draw of text-to-image sampling goes through one of these.

:class:`GeneratorRandomSource` draws from ``torch.Generator`` s (one for the whole batch, or one per image);
:class:`ReplayRandomSource` replays recorded generation orders and noise draws in sequence (used to reproduce a
recorded reference run exactly).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class GeneratorRandomSource:
    """Draws from one ``torch.Generator`` or from one generator per image.

    With a list, image ``i`` uses ``generators[i]`` only, so its sample does not depend on the rest of the batch.
    """

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> None:
        self.per_image = isinstance(generator, (list, tuple))
        if self.per_image:
            if not generator:
                raise ValueError("generator: an empty list of generators was given")
            self.generators: list[torch.Generator | None] = list(generator)
        else:
            self.generators = [generator]

    def _generator_for(self, index: int) -> torch.Generator | None:
        return self.generators[index % len(self.generators)]

    @staticmethod
    def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
        return generator.device if generator is not None else torch.device(device)

    def orders(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        rows = []
        for i in range(batch):
            generator = self._generator_for(i)
            draw_device = self._draw_device(generator, device)
            rows.append(torch.randperm(seq_len, generator=generator, device=draw_device))
        return torch.stack(rows).to(device)

    def randn(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, groups: int = 1
    ) -> torch.Tensor:
        if not self.per_image:
            generator = self.generators[0]
            draw_device = self._draw_device(generator, device)
            return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
        if shape[0] % groups:
            raise ValueError(f"cannot split {shape[0]} rows into {groups} equal groups")
        block = (shape[0] // groups, *shape[1:])
        draws = []
        for i in range(groups):
            generator = self._generator_for(i)
            draws.append(torch.randn(block, generator=generator, device=self._draw_device(generator, device), dtype=dtype))
        return torch.cat(draws).to(device)


class ReplayRandomSource:
    """Replays recorded generation orders and noise draws, in the order they were recorded.

    A draw whose shape differs from the recorded one, or a draw past the end of the record, raises.
    """

    def __init__(self, orders: torch.Tensor, noises: Iterable[torch.Tensor]) -> None:
        self._orders = orders
        self._noises = list(noises)
        self.position = 0

    def orders(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        if tuple(self._orders.shape[1:]) != (seq_len,) or self._orders.shape[0] < batch:
            raise ValueError(f"recorded orders {tuple(self._orders.shape)} cannot serve ({batch}, {seq_len})")
        return self._orders[:batch].to(device)

    def randn(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, groups: int = 1
    ) -> torch.Tensor:
        if self.position >= len(self._noises):
            raise IndexError(f"replay exhausted after {len(self._noises)} recorded draws")
        noise = self._noises[self.position]
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"draw {self.position}: recorded shape {tuple(noise.shape)} != requested {tuple(shape)}")
        self.position += 1
        return noise.to(device=device, dtype=dtype)

    @property
    def exhausted(self) -> bool:
        return self.position == len(self._noises)


def as_random_source(
    generator: torch.Generator | Sequence[torch.Generator] | None = None, random_source=None
):
    """The random source to use: an explicit ``random_source`` wins, else one built on ``generator``."""
    if random_source is not None:
        if generator is not None:
            raise ValueError("pass either generator or random_source, not both")
        return random_source
    return GeneratorRandomSource(generator)
