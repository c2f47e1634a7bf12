"""Shared test fixtures.

The parity fixture folder (tiny random weights in the original Harmon checkpoint layouts plus the tensors the
original implementation produced from them) is read from ``$HARMON_PARITY_DIR``, by default
``../shared/fixtures/reference_parity`` beside the checkout. Parity tests skip, with that reason, only when the
folder is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

_REPO_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_PARITY_DIR = _REPO_ROOT.parent / "shared" / "fixtures" / "reference_parity"


def parity_dir_path() -> Path:
    return Path(os.environ.get("HARMON_PARITY_DIR", _DEFAULT_PARITY_DIR))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = parity_dir_path()
    if not (path / "io.safetensors").is_file():
        pytest.skip(f"parity fixture folder not found at {path} (set HARMON_PARITY_DIR)")
    return path


@pytest.fixture(scope="session")
def parity_tensors(parity_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(parity_dir / "io.safetensors"))


@pytest.fixture(scope="session")
def original_config(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "original_config.json").read_text())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Tiny models gain nothing from intra-op threads, and on a busy 2-core machine an OpenMP barrier waiting for a
    descheduled thread made such modules 10-40× slower. The caller's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_accelerate_state() -> None:
    """Each Trainer builds an Accelerator; accelerate keeps process-wide singletons between them: reset them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate_state()
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, name: str = "") -> float:
    """Assert max-abs-diff <= atol (shapes must match); return the measured max-abs-diff."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{name}: max-abs-diff {diff:.3e} > {atol:.0e}"
    return diff
