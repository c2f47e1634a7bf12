"""The exact (fused) and fast samplers against the plain one, on the tiny preset, and the benchmark's smoke run.

Tolerances: random tiny weights give tokens of ~1e4 (the untrained head's ε makes x₀ = x/√ᾱ − … large), and
the exact sampler differs from the plain one by float32 round-off only (matrix products of other shapes,
re-associated scalar algebra): measured relative differences are ~1e-7, asserted below 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harmon.heads.fused_sampler import _noise_coupling
from harmon.randomness import GeneratorRandomSource, ReplayRandomSource
from harmon.schedulers import ADMScheduler
from harmon.testing import generate_tokens, prompt_rows, tiny_model

REPO = Path(__file__).resolve().parents[1]
PROMPT_A = [1, 10, 11, 12, 13, 2, 1, 5]
PROMPT_B = [1, 20, 21, 2, 1, 5]
UNCOND = [1, 30, 31, 2, 1, 5, 6]
ROUND_OFF = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def generate(model, seed=0, prompts=(PROMPT_A,), guidance=3.0, per_image=False, random_source=None, **kwargs):
    ids, mask = prompt_rows([list(p) for p in prompts], UNCOND if guidance != 1.0 else None)
    kwargs.setdefault("image_shape", (4, 4))
    kwargs.setdefault("num_steps", 4)
    if random_source is None:
        if per_image:
            kwargs["generator"] = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        else:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
    return generate_tokens(model, ids, mask, guidance_scale=guidance, random_source=random_source, **kwargs)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class RecordingSource(GeneratorRandomSource):
    """A generator source that records every draw's request and value (to replay it, or compare orders)."""

    def __init__(self, generator):
        super().__init__(generator)
        self.requests, self.draws, self.order_draws = [], [], []

    def orders(self, batch, seq_len, device):
        out = super().orders(batch, seq_len, device)
        self.order_draws.append(out.clone())
        return out

    def randn(self, shape, device, dtype, groups=1):
        out = super().randn(shape, device, dtype, groups)
        self.requests.append((tuple(shape), groups))
        self.draws.append(out.clone())
        return out


# ------------------------------------------------------------------------------------------ exact == plain
CASES = {
    "cfg-constant": dict(),
    "cfg-linear": dict(guidance_schedule="linear", temperature=0.9),
    "no-cfg": dict(guidance=1.0),
    "generator-list": dict(prompts=(PROMPT_A, PROMPT_B), per_image=True),
    "non-square": dict(image_shape=(2, 5), num_steps=3, guidance_schedule="linear"),
    "one-token-per-step": dict(num_steps=16, temperature=1.1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_sampler_equals_plain_to_round_off(model, case):
    kwargs = CASES[case]
    plain = generate(model, seed=7, sampler="plain", **kwargs)
    exact = generate(model, seed=7, sampler="exact", **kwargs)
    assert exact.shape == plain.shape
    assert relative_difference(exact, plain) < ROUND_OFF
    torch.testing.assert_close(exact, plain, rtol=ROUND_OFF, atol=ROUND_OFF * float(plain.abs().max()))


def test_exact_is_the_default_sampler(model):
    assert torch.equal(generate(model, seed=3), generate(model, seed=3, sampler="exact"))


def test_exact_sampler_makes_the_same_draws_in_the_same_order(model):
    sources = {}
    for sampler in ("plain", "exact", "fast"):
        sources[sampler] = RecordingSource(torch.Generator().manual_seed(11))
        generate(model, random_source=sources[sampler], sampler=sampler, guidance_schedule="linear")
    assert sources["exact"].requests == sources["plain"].requests
    # fast draws as many step noises as exact, so the random stream stays aligned with it
    assert sources["fast"].requests == sources["plain"].requests
    for a, b in zip(sources["exact"].draws, sources["plain"].draws):
        assert torch.equal(a, b)


def test_exact_sampler_replays_a_recorded_plain_run(model):
    recorder = RecordingSource(torch.Generator().manual_seed(5))
    plain = generate(model, random_source=recorder, sampler="plain", guidance_schedule="linear")
    replay = ReplayRandomSource(recorder.order_draws[0], recorder.draws)
    exact = generate(model, random_source=replay, sampler="exact", guidance_schedule="linear")
    assert replay.exhausted
    assert relative_difference(exact, plain) < ROUND_OFF


def test_head_sampler_equals_head_sample(model):
    head = model.head
    fused = head.prepare_sampler()
    c = torch.randn(6, head.config.cond_dim, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 2.5, torch.tensor([1.7])):
        groups = 1 if isinstance(scale, float) and scale == 1.0 else 2
        plain = head.sample(c, 0.8, scale, GeneratorRandomSource(torch.Generator().manual_seed(1)), groups)
        for _ in range(2):  # a sampler is reusable: no state carried between calls
            out = fused(c, 0.8, scale, GeneratorRandomSource(torch.Generator().manual_seed(1)), groups)
            assert relative_difference(out, plain) < ROUND_OFF


def test_modulations_in_chunks_equal_one_chunk(model):
    c = torch.randn(4, model.head.config.cond_dim, generator=torch.Generator().manual_seed(0))
    whole = model.head.prepare_sampler()
    one_step_chunks = model.head.prepare_sampler(chunk_bytes=1)
    draws = lambda: GeneratorRandomSource(torch.Generator().manual_seed(2))  # noqa: E731
    assert torch.allclose(whole(c, 1.0, 3.0, draws(), 2), one_step_chunks(c, 1.0, 3.0, draws(), 2), rtol=1e-6)


# ------------------------------------------------------------------------------------------------- fast
def test_fast_sampler_is_deterministic_per_seed_and_close_to_exact(model):
    a = generate(model, seed=1, sampler="fast")
    b = generate(model, seed=1, sampler="fast")
    exact = generate(model, seed=1, sampler="exact")
    other_seed = generate(model, seed=2, sampler="exact")
    assert torch.equal(a, b)
    assert a.shape == exact.shape
    assert not torch.allclose(a, exact)
    # coupled to the exact sampler's draws: far closer to the exact sample of the same seed than another sample is
    # (measured on this random tiny model: 3e-4 against 1.4 for another seed)
    assert relative_difference(a, exact) < 1e-2
    assert relative_difference(a, exact) < 0.01 * relative_difference(other_seed, exact)


def test_fast_sampler_head_steps_and_errors(model):
    configured = model.head.sample_diffusion.num_timesteps
    assert model.head.prepare_sampler(fast=True).num_steps == configured // 4
    assert generate(model, seed=1, sampler="fast", head_steps=5).shape == (1, 4, 4, model.config.token_dim)
    with pytest.raises(ValueError, match="head_steps"):
        generate(model, sampler="fast", head_steps=configured + 1)
    with pytest.raises(ValueError, match="head_steps"):
        generate(model, sampler="exact", head_steps=5)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, sampler="turbo")


def test_a_head_without_a_fused_sampler_falls_back_to_its_own_sample(model, monkeypatch):
    plain = generate(model, seed=4, sampler="plain")
    monkeypatch.setattr(model.head, "prepare_sampler", None, raising=False)
    # same head loop; the decoder's last block at the predicted positions only is the one round-off difference
    assert relative_difference(generate(model, seed=4, sampler="exact"), plain) < ROUND_OFF
    with pytest.raises(ValueError, match="prepare_sampler"):
        generate(model, seed=4, sampler="fast")


def test_noise_coupling_gives_standard_normal_independent_noises():
    fine = ADMScheduler().respaced(100)
    for steps in (50, 25, 10, 1):
        coarse = fine.respaced(steps)
        weights = _noise_coupling(fine, coarse)
        assert weights.shape == (steps, 100)
        assert np.allclose(weights[0], 0.0)
        # unit rows (standard normal noise), disjoint supports (independent across steps)
        assert np.allclose(np.linalg.norm(weights[1:], axis=1), 1.0)
        assert np.all((weights != 0).sum(axis=0) <= 1)


# --------------------------------------------------------------------------------------------- benchmark
def test_benchmark_quick_run_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--quick", "--quality", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.endswith(".json") for name in files) and any(name.endswith(".md") for name in files)
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert stored["device"] == report["device"]
    modes = stored["cases"][0]["modes"]
    assert set(modes) == {"plain", "exact", "fast"}
    for result in modes.values():
        assert result["tokens_s"] > 0 and result["speedup_tokens"] > 0
        assert set(result["phases_s"]) == set(bench.PHASES)
    rows = stored["quality"][0]["rows"]
    assert rows["plain, same seed"]["latent_rel_mse"] < 1e-9

    lean = bench.main(["--quick", "--no-phases", "--modes", "plain", "exact", "--out", str(tmp_path / "lean")])
    for result in lean["cases"][0]["modes"].values():
        assert result["phases_s"] is None and result["tokens_s"] > 0 and result["peak_memory_mb"] is not None
    assert "| – |" in next((tmp_path / "lean").glob("*.md")).read_text()


# ------------------------------------------------------------------------ the decoder at the predicted positions
def decoder_inputs(model, seen: int, batch: int = 3, seed: int = 0):
    decoder = model.decoder
    generator = torch.Generator().manual_seed(seed)
    length = 16
    mask = torch.ones(batch, length)
    for row in range(batch):
        mask[row, torch.randperm(length, generator=generator)[:seen]] = 0
    x = torch.randn(batch, decoder.buffer_size + seen, decoder.config.encoder_dim, generator=generator)
    return x, mask


@pytest.mark.parametrize("seen", [0, 5, 15])
def test_decoder_at_positions_equals_the_whole_decoder_indexed(model, seen):
    x, mask = decoder_inputs(model, seen)
    full = model.decoder(x, mask, (4, 4))
    generator = torch.Generator().manual_seed(seen)
    equal_counts = torch.zeros_like(mask, dtype=torch.bool)
    for row in range(mask.shape[0]):
        equal_counts[row, torch.randperm(16, generator=generator)[:3]] = True
    unequal_counts = equal_counts.clone()
    unequal_counts[0] = True
    for positions in (equal_counts, unequal_counts, torch.ones_like(equal_counts)):
        at = model.decoder(x, mask, (4, 4), positions=positions)
        assert at.shape == (int(positions.sum()), model.decoder.embed_dim)
        torch.testing.assert_close(at, full[positions], rtol=1e-5, atol=1e-6)
    # nothing asked: nothing returned
    assert model.decoder(x, mask, (4, 4), positions=torch.zeros_like(equal_counts)).shape == (0, model.decoder.embed_dim)
    with pytest.raises(ValueError, match="positions"):
        model.decoder(x, mask, (4, 4), positions=equal_counts[:, :5])


def test_vit_block_at_positions_equals_the_block_and_declines_training_mode(model):
    from harmon.layers import vit_block_at

    block = model.decoder.blocks[-1]
    x = torch.randn(2, 24, model.decoder.embed_dim, generator=torch.Generator().manual_seed(3))
    index = torch.tensor([[0, 7, 23], [2, 3, 4]])
    expected = torch.stack([block(x)[row, index[row]] for row in range(2)])
    torch.testing.assert_close(vit_block_at(block, x, index), expected, rtol=1e-5, atol=1e-6)
    block.train()
    try:
        assert vit_block_at(block, x, index) is None  # dropout and drop-path act in training: not reproduced
    finally:
        block.eval()
    assert vit_block_at(torch.nn.Linear(4, 4), x, index) is None


def test_exact_sampler_uses_the_decoder_at_positions_and_plain_does_not(model, monkeypatch):
    calls = []
    forward = type(model.decoder).forward

    def spy(self, x, mask, image_shape, positions=None):
        calls.append(positions is not None)
        return forward(self, x, mask, image_shape, positions=positions)

    monkeypatch.setattr(type(model.decoder), "forward", spy)
    generate(model, seed=5, sampler="exact")
    assert calls and all(calls)
    calls.clear()
    generate(model, seed=5, sampler="plain")
    assert calls and not any(calls)


def test_scheduler_step_runs_its_arithmetic_in_float32_for_half_samples():
    # at t = 999 the predicted x₀ is x/√ᾱ with 1/√ᾱ ≈ 1e4: for x = 8 it is ~8e4, past float16's 65504, although
    # the step's result (the posterior mean) is of the order of x
    from harmon.schedulers import ADMScheduler

    scheduler = ADMScheduler()
    sample = torch.full((2, 4), 8.0)
    output = torch.cat([torch.full((2, 4), 0.5), torch.zeros(2, 4)], dim=1)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    reference = scheduler.step(output, 999, sample, noise=noise)
    half = scheduler.step(output.half(), 999, sample.half(), noise=noise.half())
    assert half.prev_sample.dtype == torch.float16
    assert half.pred_original_sample.dtype == torch.float32
    assert reference.pred_original_sample.abs().max() > 65504  # the case float16 arithmetic cannot hold
    assert bool(torch.isfinite(half.pred_original_sample).all())
    scale = max(1.0, reference.prev_sample.abs().max().item())
    assert (half.prev_sample.float() - reference.prev_sample).abs().max().item() <= 2e-3 * scale
