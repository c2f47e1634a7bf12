"""Every sampler × guidance schedule × dtype on CPU, through the public API and the CLI (``--dtype``).

The README's first example runs in bfloat16 with ``guidance_schedule="linear"``; a float32 scale tensor leaking
into the head crashed it (``mat1 and mat2 must have the same dtype``). Each combination must give finite images
of the requested shape. float16 runs where this CPU can multiply half-precision matrices (skipped otherwise).
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from harmon.cli import main
from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLERS = ("exact", "plain", "fast")
SCHEDULES = ("constant", "linear")
STEPS = 2


def _half_supported() -> str | None:
    """None when float16 linear layers run on this CPU, else the reason they do not."""
    try:
        layer = torch.nn.Linear(4, 4).to(torch.float16)
        layer(torch.ones(2, 4, dtype=torch.float16))
    except RuntimeError as error:
        return f"float16 is not supported on this CPU ({error})"
    return None


DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float16, id="float16", marks=[
        pytest.mark.skipif(_half_supported() is not None, reason=str(_half_supported())),
        # The chain's arithmetic runs in float32 (sampling_dtype, as ADM), but the *random* tiny head's samples
        # themselves leave float16's range: on its 3-step chain the first step takes tokens of |x| ≈ 2 to 8.5e3 and
        # the next to 6.9e4 (measured in float32) > 65504, so the float16 denoiser's input is inf. Trained weights
        # keep their tokens at |x| < 5: test_float16_follows_float32_on_trained_weights checks float16 there.
        pytest.mark.xfail(reason="the random tiny head's samples exceed float16's range (6.9e4 measured)",
                          strict=True),
    ]),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtype-pipeline")
    HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pipes(saved):
    loaded = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pipe = HarmonPipeline.from_pretrained(str(saved), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        loaded[dtype] = pipe
    return loaded


def _sampler_kwargs(sampler: str) -> dict:
    return {"sampler": sampler, **({"head_steps": 3} if sampler == "fast" else {})}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_pipeline_generates_finite_images_in_every_dtype(pipes, sampler, schedule, dtype):
    pipe = pipes[dtype]
    assert pipe.model.head.parameters().__next__().dtype == dtype
    images = pipe(
        ["a red circle", "a blue square"], height=64, width=48, num_inference_steps=STEPS, guidance_scale=3.0,
        guidance_schedule=schedule, generator=[torch.Generator().manual_seed(i) for i in range(2)],
        output_type="pt", **_sampler_kwargs(sampler),
    ).images
    assert tuple(images.shape) == (2, 3, 64, 48)
    assert bool(torch.isfinite(images.float()).all()), f"{sampler}/{schedule}/{dtype}: non-finite pixels"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cli_generates_in_every_dtype(saved, tmp_path, sampler, schedule, dtype):
    name = str(dtype).removeprefix("torch.")
    out = tmp_path / "out"
    argv = ["generate", str(saved), "--prompt", "a red circle", "--steps", str(STEPS), "--dtype", name,
            "--guidance-schedule", schedule, "--sampler", sampler, "--height", "64", "--width", "48",
            "--device", "cpu", "--out", str(out)]
    if sampler == "fast":
        argv += ["--head-steps", "3"]
    assert main(argv) == 0
    image = PIL.Image.open(out / "00000_0.png")
    assert image.size == (48, 64) and image.mode == "RGB"
    # non-finite pixels become one flat colour in the PNG; a real sample of the random model is not flat
    assert len(set(image.getdata())) > 1, f"{sampler}/{schedule}/{name}: a flat image (non-finite pixels?)"


@pytest.mark.skipif(_half_supported() is not None, reason=str(_half_supported()))
def test_float16_follows_float32_on_trained_weights():
    """harmon-toy (trained) in float16 gives finite tokens close to float32's. Measured on the shipped weights
    (exact sampler, 2 MAR steps, seed 0, 1000-step head chain): max |fp16 − fp32| = 0.0030 on tokens of max 3.4
    with the chain in float32; 0.138 when the chain ran in float16 (the ancestral mean A·x − B·ε with A, B ≈ 32
    at t ≈ 999 cancels in half precision; the first round's weights: 0.054 against 0.164). The bound, 3% of the
    tokens' scale, separates the two."""
    latents = {}
    for dtype in (torch.float32, torch.float16):
        pipe = HarmonPipeline.from_pretrained("harmon-toy", dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        latents[dtype] = pipe("a red 3 on the left", num_inference_steps=2, sampler="exact", output_type="latent",
                              generator=torch.Generator().manual_seed(0)).images.float()
    reference, half = latents[torch.float32], latents[torch.float16]
    assert bool(torch.isfinite(half).all())
    scale = max(1.0, reference.abs().max().item())
    assert (half - reference).abs().max().item() <= 0.03 * scale
