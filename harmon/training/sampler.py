"""Mixing the three tasks into micro-batches: seeded, sharded across processes and resumable from a step count.

Every micro-batch holds one task. Tasks follow a cycle holding each task as many times as its ratio (1:3:8 → a
cycle of 12 micro-batches), shuffled afresh for each cycle from ``(seed, cycle)``; every process runs the same task
at the same micro-step (so DDP/FSDP ranks run the same modules), on its own samples. Each task draws its samples
from an endless stream over its sources: epoch ``e`` is a permutation seeded by ``(seed, task, e)``; micro-step
``k`` of process ``r`` takes stream positions ``(j·world + r)·b … + b`` where ``j`` counts the earlier
micro-batches of that task.

Everything is a pure function of the micro-step index, so the data position of a run is its micro-step count:
resuming needs no replay of the skipped batches. (A torch ``Sampler`` + accelerate's ``skip_first_batches``
restore one dataset's position; they neither mix sources by ratio nor keep the task aligned across ranks —
accelerate's batch sharding hands consecutive batches to different ranks — hence this hand-written sampler.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from harmon.training.config import TASKS

_CYCLE_TAG = 0x7A5C
_EPOCH_TAG = 0xE90C


class TaskSchedule:
    """Which task micro-step ``k`` runs, and how many micro-batches of a task came before it."""

    def __init__(self, ratios: Mapping[str, int], seed: int) -> None:
        unknown = sorted(set(ratios) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks are {TASKS}")
        if any(int(r) < 0 for r in ratios.values()) or sum(int(r) for r in ratios.values()) <= 0:
            raise ValueError(f"task ratios must be non-negative and not all zero, got {dict(ratios)}")
        self.ratios = {task: int(ratios.get(task, 0)) for task in TASKS}
        self.seed = int(seed)
        self.base = [task for task in TASKS for _ in range(self.ratios[task])]
        self._cache: tuple[int, list[str]] | None = None

    @property
    def cycle_length(self) -> int:
        return len(self.base)

    def cycle(self, index: int) -> list[str]:
        if self._cache is None or self._cache[0] != index:
            order = np.random.default_rng((self.seed, _CYCLE_TAG, index)).permutation(len(self.base))
            self._cache = (index, [self.base[i] for i in order])
        return self._cache[1]

    def task_at(self, micro_step: int) -> str:
        cycle, offset = divmod(micro_step, self.cycle_length)
        return self.cycle(cycle)[offset]

    def count_before(self, task: str, micro_step: int) -> int:
        cycle, offset = divmod(micro_step, self.cycle_length)
        return cycle * self.ratios[task] + self.cycle(cycle)[:offset].count(task)


class IndexStream:
    """An endless stream over ``range(size)``: one seeded permutation per epoch."""

    def __init__(self, size: int, seed: int, stream_id: int) -> None:
        if size <= 0:
            raise ValueError("an index stream needs at least one item")
        self.size, self.seed, self.stream_id = size, int(seed), stream_id
        self._epoch: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng((self.seed, _EPOCH_TAG, self.stream_id, epoch))
            self._epoch = (epoch, rng.permutation(self.size))
        return self._epoch[1]

    def take(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            epoch, offset = divmod(p, self.size)
            out.append(int(self.permutation(epoch)[offset]))
        return out


class MultiTaskBatchSampler:
    """Batch sampler for a ``DataLoader``: yields lists of ``(task, index, draw)`` keys, micro-steps
    ``start … stop-1`` of process ``rank`` of ``world``. ``draw`` is the sample's position in its task stream
    (unique per drawn sample), the seed of its per-sample randomness (e.g. the caption drop)."""

    def __init__(
        self,
        schedule: TaskSchedule,
        sizes: Mapping[str, int],
        micro_batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        for task, ratio in schedule.ratios.items():
            if ratio > 0 and sizes.get(task, 0) <= 0:
                raise ValueError(f"task {task} has ratio {ratio} but no sample")
        self.schedule = schedule
        self.streams = {
            task: IndexStream(sizes[task], seed, TASKS.index(task)) for task in TASKS if schedule.ratios[task] > 0
        }
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.start, self.stop = start, stop

    def batch_at(self, micro_step: int) -> list[tuple[str, int, int]]:
        task = self.schedule.task_at(micro_step)
        j = self.schedule.count_before(task, micro_step)
        first = (j * self.world + self.rank) * self.micro_batch_size
        indices = self.streams[task].take(first, self.micro_batch_size)
        return [(task, index, first + i) for i, index in enumerate(indices)]

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.stop - self.start)
