"""Atomic, verifiable training checkpoints around accelerate's ``save_state`` / ``load_state``.

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX``: accelerate's state (model, optimizer, scheduler,
RNG of every process), ``trainer_state.json`` (step, micro-step = data position) and, last, ``manifest.json``
listing every file with its size and SHA-256. Files are flushed to disk, then the folder is renamed to
``checkpoints/step-XXXXXXXX`` — a rename is atomic, so a visible ``step-*`` folder is complete, and a crash
leaves only a ``.tmp-*`` folder that is never loaded. Before loading, the manifest is checked: a missing
manifest, a missing, extra, truncated or altered file raises :class:`CheckpointError` naming it.

Written by hand: accelerate's automatic checkpoint naming (``ProjectConfiguration(automatic_checkpoint_naming,
total_limit)``) writes in place (a crash leaves a half-written ``checkpoint_N`` that looks loadable), keeps no
checksum, and prunes by deleting before the new save succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_FORMAT = "harmon-training-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt and was not loaded."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
        try:
            os.fsync(handle.fileno())  # on disk before the rename publishes the checkpoint
        except OSError:
            pass
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Creates, commits, lists, verifies and prunes ``step-*`` checkpoints under ``root``."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    # ------------------------------------------------------------------------------------------------- write
    def temp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}"

    def prepare(self, step: int) -> Path:
        """(main process) an empty temporary folder for the checkpoint of ``step``."""
        tmp = self.temp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, extra: dict[str, Any] | None = None) -> Path:
        """(main process) write the manifest, flush, rename ``tmp`` to ``step-*``, prune old checkpoints."""
        files = {}
        for name in _files(tmp):
            path = tmp / name
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format": MANIFEST_FORMAT, "step": step, "created": time.time(), "files": files, **(extra or {})}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        _fsync_dir(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():  # the same step saved again (e.g. after a resume): retire the old one first
            self._retire(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        for old in self.list()[: -self.keep_last]:
            self._retire(old)
        for stale in self.root.glob(".tmp-retired-*"):  # left by an interrupted deletion
            shutil.rmtree(stale, ignore_errors=True)

    def _retire(self, path: Path) -> None:
        """Hide a checkpoint from :meth:`list` atomically (a rename), then delete it."""
        retired = self.root / f".tmp-retired-{path.name}-{os.getpid()}-{time.time_ns()}"
        os.replace(path, retired)
        shutil.rmtree(retired, ignore_errors=True)

    # -------------------------------------------------------------------------------------------------- read
    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is a partial checkpoint: it has no {MANIFEST_NAME} (its save did not finish); refusing to load it"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is corrupt ({error}); refusing to load {path}") from error
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest; refusing to load {path}")
    problems = []
    listed = manifest["files"]
    present = set(_files(path)) - {MANIFEST_NAME}
    for name in sorted(set(listed) - present):
        problems.append(f"{name} is missing")
    for name in sorted(present - set(listed)):
        problems.append(f"{name} is not in the manifest")
    for name in sorted(set(listed) & present):
        file = path / name
        size = file.stat().st_size
        if size != listed[name]["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {listed[name]['size']}")
        elif _sha256(file) != listed[name]["sha256"]:
            problems.append(f"{name} fails its SHA-256 checksum")
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt, refusing to load it: " + "; ".join(problems))
    return manifest


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE_NAME).read_text())


def check_rng_state(path: str | os.PathLike, process_index: int) -> None:
    """Refuse a checkpoint whose RNG state for ``process_index`` cannot be restored exactly.

    accelerate's ``load_state`` only logs "Could not load random states" and resumes with whatever state it
    reached, so the run silently stops being the uninterrupted one. This applies the same states accelerate will
    (Python, numpy, torch CPU, and CUDA when it is available) and puts the current ones back."""
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    file = Path(path) / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: the checkpoint holds no RNG state for process {process_index} (was it written by "
            "fewer processes?); refusing to resume inexactly"
        )
    current = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        states = load(file)
        needed = ["random_state", "numpy_random_seed", "torch_manual_seed"]
        if torch.cuda.is_available():
            needed.append("torch_cuda_manual_seed")
        missing = [key for key in needed if not isinstance(states, dict) or key not in states]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and len(states["torch_cuda_manual_seed"]) != torch.cuda.device_count():
            raise ValueError(
                f"CUDA states of {len(states['torch_cuda_manual_seed'])} devices for {torch.cuda.device_count()}"
            )
    except CheckpointError:
        raise
    except Exception as error:  # whatever accelerate would swallow
        raise CheckpointError(f"{file}: the RNG state cannot be loaded ({error}); refusing to resume inexactly") from None
    finally:
        random.setstate(current[0])
        np.random.set_state(current[1])
        torch.set_rng_state(current[2])


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Cut a ``metrics.jsonl`` back to the records of steps ``<= step`` (a killed run logged past its last
    checkpoint; the resumed run logs those steps again). A torn last line is dropped too. Returns the number of
    lines removed; the file is replaced atomically."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by the kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)
