"""HarmonModel on the tiny preset (random weights): sampler behaviour, seeds, shapes, losses, save/load."""

from __future__ import annotations

import pytest
import torch

from harmon.configs import HarmonConfig
from harmon.model import HarmonModel, mask_schedule
from harmon.randomness import GeneratorRandomSource
from harmon.testing import generate_tokens, prompt_rows


@pytest.fixture(scope="module")
def model() -> HarmonModel:
    torch.manual_seed(0)
    model = HarmonModel.from_config(HarmonConfig.from_preset("tiny"))
    # the head's output layers start at zero (as in MAR); give them values so samples depend on the condition
    with torch.no_grad():
        for parameter in model.head.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.05)
    return model


PROMPT_A = [1, 10, 11, 12, 13, 2, 1, 5]
PROMPT_B = [1, 20, 21, 2, 1, 5]
UNCOND = [1, 30, 31, 2, 1, 5, 6]


def generate(model, generator=None, prompts=(PROMPT_A,), guidance=3.0, **kwargs):
    ids, mask = prompt_rows([list(p) for p in prompts], UNCOND if guidance != 1.0 else None)
    kwargs.setdefault("image_shape", (4, 4))
    kwargs.setdefault("num_steps", 4)
    return generate_tokens(model, ids, mask, guidance_scale=guidance, generator=generator, **kwargs)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- mask schedule
@pytest.mark.parametrize("seq_len,steps", [(16, 1), (16, 8), (16, 16), (256, 64), (35, 7)])
def test_mask_schedule_predicts_at_least_one_token_per_step_until_done(seq_len, steps):
    lengths = mask_schedule(seq_len, steps)
    assert len(lengths) == steps
    remaining = [seq_len, *lengths[:-1]]
    for before, after in zip(remaining[:-1], lengths[:-1]):
        assert 1 <= after < before
    # the last step predicts everything still masked
    assert remaining[-1] >= 1


def test_mask_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_steps"):
        mask_schedule(16, 0)


# --------------------------------------------------------------------------------------------------- seeds
def test_same_seed_same_tokens_and_different_seeds_differ(model):
    a = generate(model, seeded(1))
    b = generate(model, seeded(1))
    c = generate(model, seeded(2))
    assert a.shape == (1, 4, 4, model.config.token_dim)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_per_image_generators_make_each_image_independent_of_the_batch(model):
    pair = generate(model, [seeded(1), seeded(2)], prompts=(PROMPT_A, PROMPT_B))
    alone_a = generate(model, [seeded(1)], prompts=(PROMPT_A,))
    alone_b = generate(model, [seeded(2)], prompts=(PROMPT_B,))
    # batched and single-image runs differ only by round-off (random weights give tokens of ~1e4)
    assert relative_difference(pair[0], alone_a[0]) < 1e-5
    assert relative_difference(pair[1], alone_b[0]) < 1e-5
    assert relative_difference(pair[0], pair[1]) > 0.1


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_generator_list_length_must_match_images(model):
    with pytest.raises(ValueError, match="generator"):
        generate(model, [seeded(1), seeded(2)], prompts=(PROMPT_A,))


# -------------------------------------------------------------------------------------------------- shapes
def test_non_square_generation(model):
    tokens = generate(model, seeded(0), image_shape=(2, 5), num_steps=3)
    assert tokens.shape == (1, 2, 5, model.config.token_dim)
    pixels = model.decode_tokens(tokens)
    assert pixels.shape == (1, 3, 2 * 16, 5 * 16)


@pytest.mark.parametrize("steps", [1, 16])
def test_one_step_and_one_token_per_step(model, steps):
    calls = []
    tokens = generate(model, seeded(0), num_steps=steps, 
                      callback_on_step_end=lambda pipe, step, total, state: calls.append(step))
    assert calls == list(range(steps))
    assert bool((tokens.abs().sum(-1) > 0).all()), "every token must have been sampled"


def test_too_many_steps_is_an_error(model):
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate(model, seeded(0), num_steps=17)


def test_without_guidance_and_with_linear_guidance(model):
    plain = generate(model, seeded(3), guidance=1.0)
    linear = generate(model, seeded(3), guidance_schedule="linear")
    assert plain.shape == linear.shape == (1, 4, 4, model.config.token_dim)
    with pytest.raises(ValueError, match="guidance_schedule"):
        generate(model, seeded(3), guidance_schedule="cosine")
    with pytest.raises(ValueError, match="odd number of rows"):
        ids, mask = prompt_rows([PROMPT_A], None)
        generate_tokens(model, ids, mask, image_shape=(4, 4), num_steps=2, guidance_scale=2.0)


def test_prompt_cache_is_cut_back_every_step(model, monkeypatch):
    from transformers import DynamicCache

    lengths = []
    real_crop = DynamicCache.crop

    def recording_crop(self, n):
        real_crop(self, n)
        lengths.append(self.get_seq_length())

    monkeypatch.setattr(DynamicCache, "crop", recording_crop)
    generate(model, seeded(0), num_steps=4)
    assert len(lengths) == 4 and len(set(lengths)) == 1, lengths


def test_random_source_is_used_for_every_draw(model):
    class CountingSource(GeneratorRandomSource):
        draws = 0

        def randn(self, *args, **kwargs):
            CountingSource.draws += 1
            return super().randn(*args, **kwargs)

    generate(model, random_source=CountingSource(seeded(0)), num_steps=2)
    steps = model.head.sample_diffusion.num_timesteps
    assert CountingSource.draws == 2 * (1 + steps)


# ---------------------------------------------------------------------------------------------- understanding
def test_understanding_answer_has_requested_length(model):
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    image_embeds = model.image_embeddings(pixels)
    assert image_embeds.shape == (1, 16 + model.buffer_size, model.llm.config.hidden_size)
    image_id = 255
    ids = torch.tensor([[1, 7, 8] + [image_id] * image_embeds.shape[1] + [9, 2, 1]])
    embeds = model.splice_image_embeddings(ids, image_embeds, image_id)
    out = model.answer(embeds, max_new_tokens=5, min_new_tokens=5, eos_token_id=2, pad_token_id=0)
    assert out.shape[-1] == 5
    with pytest.raises(ValueError, match="image placeholder"):
        model.splice_image_embeddings(ids[:, :-5], image_embeds, image_id)


# ---------------------------------------------------------------------------------------------------- losses
def test_text_to_image_loss_trains_encoder_head_and_connectors(model):
    tokens = model.encode_image(torch.rand(2, 3, 64, 64) * 2 - 1)
    ids, mask = prompt_rows([PROMPT_A, PROMPT_B], None)
    model.zero_grad()
    loss = model.text_to_image_loss(tokens, ids, mask, generator=seeded(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name in ("encoder.z_proj.weight", "proj_in.0.weight", "proj_out.2.weight", "head.net.input_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_training_mask_ratio_is_at_least_the_minimum(model):
    for seed in range(5):
        mask = model.random_training_mask(3, 100, seeded(seed))
        counts = mask.sum(-1)
        assert bool((counts == counts[0]).all())
        assert 70 <= int(counts[0]) <= 100


def test_image_to_text_loss_scales_the_visual_gradient(model):
    tokens = model.encode_image(torch.rand(1, 3, 64, 64) * 2 - 1)
    image_id = 255
    n_image = 16 + model.buffer_size
    ids = torch.tensor([[1, 7] + [image_id] * n_image + [9, 2, 1, 40, 41, 2]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    mask = torch.ones_like(ids)

    def encoder_grad(scale: float) -> torch.Tensor:
        model.zero_grad()
        object.__setattr__(model, "config", model.config.model_copy(update={"visual_grad_scale": scale}))
        model.image_to_text_loss(tokens, ids, mask, labels, image_id).backward()
        return model.encoder.z_proj.weight.grad.clone()

    full, scaled = encoder_grad(1.0), encoder_grad(0.1)
    object.__setattr__(model, "config", model.config.model_copy(update={"visual_grad_scale": 0.1}))
    model.zero_grad()
    assert full.abs().sum() > 0
    assert torch.allclose(scaled, 0.1 * full, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="labels"):
        model.image_to_text_loss(tokens, ids, mask, torch.full_like(ids, -100), image_id)


# ------------------------------------------------------------------------------------------------- save/load
def test_save_and_load_give_the_same_samples(model, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    loaded = HarmonModel.from_pretrained(tmp_path / "tiny")
    assert torch.equal(generate(model, seeded(5)), generate(loaded, seeded(5)))


def test_loading_a_folder_without_weights_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="harmon_config.json"):
        HarmonModel.from_pretrained(tmp_path)
