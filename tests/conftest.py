"""Shared test fixtures.

The parity fixture folder (tiny random weights in the original Harmon checkpoint layouts plus the tensors the
original implementation produced from them) is read from ``$HARMON_PARITY_DIR``, by default
``../shared/fixtures/reference_parity`` beside the checkout. Parity tests skip, with that reason, only when the
folder is absent.
"""

from __future__ import annotations

import json
import os
import re
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, name: str = "") -> float:
    """Assert ``max|actual - expected| <= tol * max(1, max|expected|)`` (shapes must match): a tolerance relative to
    the reference's magnitude, so that float32 resolution on large values (10^3..10^5) is not mistaken for an error.
    Returns the measured max-abs-diff."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.numel():
        return 0.0
    reference = expected.detach().double()
    diff = (actual.detach().double() - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    assert diff <= tol * scale, (
        f"{name}: max-abs-diff {diff:.3e} > {tol:.0e} * max(1, max|ref| = {scale:.3e}) (relative {diff / scale:.3e})"
    )
    return diff


def relative_scale(expected: torch.Tensor) -> float:
    """``max(1, max|expected|)``: what :func:`assert_close`'s tolerance is relative to."""
    return max(1.0, expected.detach().double().abs().max().item()) if expected.numel() else 1.0


# --- what a parity fixture documents about the calls that recorded it ------------------------------------------
def parity_readme(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "README.json").read_text())


def recorded_argument(readme: dict, group: str, argument: str) -> str:
    """The literal ``argument=VALUE`` in README.json's description of the tensor group ``group`` (the call that
    recorded it), as text; fails naming the group and argument when the description does not state it."""
    description = readme["tensor_groups"][group]
    found = re.search(rf"\b{re.escape(argument)}\s*=\s*('[^']*'|\"[^\"]*\"|[-+0-9.eE]+)", description)
    assert found, f"README.json tensor_groups[{group!r}] does not state {argument}=...: {description!r}"
    return found.group(1).strip("'\"")


def recorded_image_token_id(readme: dict, tensors: dict[str, torch.Tensor], vocab_size: int) -> int:
    """The image placeholder id of ``und.input_ids``: ``und.image_token_id`` where the fixture records it, else what
    README.json documents (``... placeholder id (vocab_size-1) ...`` or a number). Checked against the recording:
    the id must fill exactly as many positions of ``und.input_ids`` as ``und.z_enc`` has visual embeddings."""
    if "und.image_token_id" in tensors:
        image_id = int(tensors["und.image_token_id"])
    else:
        description = readme["tensor_groups"]["und.input_ids"]
        found = re.search(r"placeholder id \(\s*(vocab_size\s*-\s*(\d+)|\d+)\s*\)", description)
        assert found, f"README.json does not document the image placeholder id of und.input_ids: {description!r}"
        image_id = vocab_size - int(found.group(2)) if found.group(2) else int(found.group(1))
    visual = tensors["und.z_enc"].shape[1]
    count = int((tensors["und.input_ids"] == image_id).sum())
    assert count == visual, f"placeholder id {image_id} fills {count} positions of und.input_ids, expected {visual}"
    return image_id


def parity_files(parity_dir: Path) -> dict[str, Path]:
    """The fixture's release files by role, as its README.json lists them (``files``): the Harmon checkpoint
    (``*.pth``), the VAE checkpoint (``*.ckpt``), the LLM folder (``*/``) and the original config (``*.json``)."""
    listed = parity_readme(parity_dir)["files"]
    roles = {"harmon": ".pth", "vae": ".ckpt", "llm": "/", "config": ".json"}
    found = {}
    for role, ending in roles.items():
        names = [name for name in listed if name.endswith(ending)]
        assert len(names) == 1, f"README.json files: expected one {ending} entry for the {role}, got {names}"
        found[role] = parity_dir / names[0].rstrip("/")
    return found


@pytest.fixture(scope="session")
def fixture_files(parity_dir: Path) -> dict[str, Path]:
    return parity_files(parity_dir)


def replay_recorded_image(pipe, tensors: dict[str, torch.Tensor], readme: dict, sampler: str = "exact") -> torch.Tensor:
    """The fixture's end-to-end call (``e2e.*``) replayed through ``pipe``'s own MAR loop with the recorded orders
    and noise draws, the call's arguments taken from README.json; returns the decoded pixels ``(B, 3, H, W)``."""
    from harmon.randomness import ReplayRandomSource

    t = tensors
    noises = [t[k] for k in sorted(k for k in t if k.startswith("e2e.noise."))]
    source = ReplayRandomSource(t["e2e.orders"], noises)
    _, m, n, _ = t["vae.tokens"].shape
    stride = pipe.harmon.harmon.latent_stride
    latents = pipe(
        prompt_input_ids=t["e2e.input_ids"],
        prompt_attention_mask=t["e2e.attention_mask"],
        height=m * stride,
        width=n * stride,
        num_inference_steps=len(t["e2e.mask_len"]),
        guidance_scale=float(recorded_argument(readme, "e2e.*", "cfg")),
        guidance_schedule=recorded_argument(readme, "e2e.*", "cfg_schedule"),
        temperature=float(recorded_argument(readme, "e2e.*", "temperature")),
        random_source=source,
        sampler=sampler,
        output_type="latent",
    ).images
    assert source.exhausted, f"used {source.position} of {len(noises)} recorded draws"
    with torch.no_grad():
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
