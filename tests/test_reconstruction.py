"""RecA's reconstruction task (arXiv 2509.07295) on the tiny model: the loss against a hand-assembled reference
(shared and decoupled encoders), the 0.1 gradient scale on the understanding path, the data/collator/recipe
plumbing and a short training run of the ``reconstruction`` task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state
from pydantic import ValidationError

from harmon.configs import ComponentSpec, PromptTemplate
from harmon.image_conditioning import image_generation_input
from harmon.testing import tiny_model, tiny_tokenizer
from harmon.training.collator import HarmonCollator
from harmon.training.config import TASKS, load_config
from harmon.training.data import MultiTaskDataset
from harmon.training.synthetic import write_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
IMAGE_ID = 3  # "<image>" in the tiny tokenizer
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECOUPLED = {
    "shared": None,
    "mar": ComponentSpec(name="mar-tiny"),
    "siglip": ComponentSpec(name="siglip-tiny", config={"image_size": 32}),
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    scale = max(1.0, float(expected.detach().abs().max()))
    error = float((actual - expected).detach().abs().max())
    assert error <= tol * scale, f"max|a-b| = {error:.3e} > {tol} * {scale:.3e}"


def prompt_rows(model, batch: int, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = tiny_tokenizer()
    text = image_generation_input(model.config.generation_prefix, "<image>" * image_tokens)
    ids = tokenizer(model.config.prompt_template.instruction.format(input=text), add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids] * batch)
    return input_ids, torch.ones_like(input_ids)


def batch_for(model, seed: int = 0):
    pixels = (torch.rand(2, 3, 64, 64, generator=seeded(seed)) * 2 - 1)
    tokens = model.encode_image(pixels)
    image_tokens = model.understanding_embeddings(pixels, tokens=tokens).shape[1]
    input_ids, attention_mask = prompt_rows(model, 2, image_tokens)
    mask = model.random_training_mask(2, tokens.shape[1] * tokens.shape[2], seeded(7))
    return pixels, tokens, input_ids, attention_mask, mask


def reference_understanding(model, pixels, tokens):
    """The understanding path assembled by hand from the model's modules."""
    encoder = model.understanding_encoder
    if encoder is None:  # shared: the MAR encoder with nothing masked, proj_in, buffer moved to the end
        return model.visual_features(tokens)[1]
    if model.understanding_reads_pixels:
        return model.understanding_proj_in(encoder.encode(encoder.preprocess(pixels)))
    x = model.understanding_proj_in(encoder.encode(tokens))
    k = encoder.buffer_size
    return torch.cat([x[:, k:], x[:, :k]], dim=1)


def reference_loss(model, pixels, tokens, input_ids, attention_mask, mask, generator):
    z_understanding = reference_understanding(model, pixels, tokens)
    embeds = model.embed_text(input_ids).clone()
    embeds[input_ids == IMAGE_ID] = z_understanding.reshape(-1, z_understanding.shape[-1])  # row-major order
    x_enc = model.encoder_step(tokens, mask, attention_mask, prompt_embeds=embeds)
    batch, m, n, channels = tokens.shape
    z = model.decoder(x_enc, mask, (m, n)).reshape(batch * m * n, -1)
    repeats = model.head.config.diffusion_batch_mul
    target = tokens.reshape(batch * m * n, channels)
    return model.head.loss(target.repeat(repeats, 1), z.repeat(repeats, 1), mask.reshape(-1).repeat(repeats),
                           generator=generator)


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


def model_for(models: dict, kind: str):
    if kind not in models:
        models[kind] = tiny_model(seed=1, understanding_encoder=DECOUPLED[kind])
    return models[kind]


@pytest.mark.parametrize("kind", sorted(DECOUPLED))
def test_reconstruction_loss_equals_the_hand_assembled_reference(models, kind):
    model = model_for(models, kind)
    pixels, tokens, input_ids, attention_mask, mask = batch_for(model)
    loss = model.reconstruction_loss(tokens, input_ids, attention_mask, IMAGE_ID, pixels=pixels, mask=mask,
                                     generator=seeded(3))
    expected = reference_loss(model, pixels, tokens, input_ids, attention_mask, mask, seeded(3))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert_close(loss, expected)
    # the embeddings matter: the same prompt with the placeholder tokens' own embeddings gives another loss,
    # and so does conditioning on another image's embeddings (same target, mask and noise)
    plain = model.text_to_image_loss(tokens, input_ids, attention_mask, mask=mask, generator=seeded(3))
    assert abs(float(plain.detach()) - float(loss.detach())) > 1e-6  # float32 round-off of the loss: ~1e-7
    other_pixels = batch_for(model, seed=5)[0]
    other = reference_loss(model, other_pixels, model.encode_image(other_pixels), input_ids, attention_mask, mask,
                           seeded(3))
    swapped = model.reconstruction_loss(
        tokens, input_ids, attention_mask, IMAGE_ID, pixels=pixels, mask=mask, generator=seeded(3)
    )
    assert_close(swapped, loss)  # seeded: the same call gives the same loss
    assert abs(float(other.detach()) - float(loss.detach())) > 1e-6


def encoder_gradients(model, scale: float, batch, module_name: str) -> torch.Tensor:
    pixels, tokens, input_ids, attention_mask, mask = batch
    model.config = model.config.model_copy(update={"visual_grad_scale": scale})
    model.zero_grad(set_to_none=True)
    loss = model.reconstruction_loss(tokens, input_ids, attention_mask, IMAGE_ID, pixels=pixels, mask=mask,
                                     generator=seeded(3))
    loss.backward()
    module = getattr(model, module_name)
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind", ["shared", "mar"])
def test_reconstruction_gradient_reaches_the_understanding_encoder_scaled(models, kind):
    model = model_for(models, kind)
    original = model.config
    batch = batch_for(model)
    try:
        if kind == "shared":
            # the shared encoder gets the generation path's gradient plus scale × the understanding path's:
            # g(s) = g(0) + s·(g(1) − g(0)), and the understanding part is not zero
            g0, g01, g1 = (encoder_gradients(model, s, batch, "encoder") for s in (0.0, 0.1, 1.0))
            understanding = g1 - g0
            assert float(understanding.abs().max()) > 1e-6
            assert_close(g01 - g0, 0.1 * understanding, tol=1e-5)  # measured 7e-9 (max|g(0)| 0.22, max|g(1)−g(0)| 1.8e-3)
        else:
            # decoupled: the understanding encoder is reached through the understanding path only
            g01, g1 = (encoder_gradients(model, s, batch, "understanding_encoder") for s in (0.1, 1.0))
            assert float(g1.abs().max()) > 1e-6
            assert_close(g01, 0.1 * g1)
            assert encoder_gradients(model, 0.0, batch, "understanding_encoder").abs().max() == 0
    finally:
        model.config = original
        model.zero_grad(set_to_none=True)


def test_reconstruction_loss_needs_the_image_and_matching_placeholders(models):
    model = model_for(models, "shared")
    pixels, tokens, input_ids, attention_mask, mask = batch_for(model)
    with pytest.raises(ValueError, match="tokens .*or pixels"):
        model.reconstruction_loss(None, input_ids, attention_mask, IMAGE_ID)
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model.reconstruction_loss(tokens, input_ids[:, :-3], attention_mask[:, :-3], 99, mask=mask)


# ------------------------------------------------------------------------------------------------ data, recipes
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=12, size=64, seed=0)


def recon_data(shapes: Path, **extra) -> dict:
    return {
        "root": str(shapes), "image_size": 64, "max_length": 160, "num_workers": 0,
        "ratios": {"reconstruction": 2, "image_to_text": 2},
        "reconstruction": [{"format": "images", "folder": "images"}, {"format": "caption", "data_info": "data_info.json"},
                           {"format": "llava", "path": "llava.json"}],
        "image_to_text": [{"format": "llava", "path": "llava.json"}],
        **extra,
    }


def recon_recipe(shapes: Path, output_dir: Path, **data) -> dict:
    return {
        "output_dir": str(output_dir), "model": {"preset": "tiny"},
        "learning_rates": {"encoder": 1e-3, "decoder": 1e-3, "llm": 1e-3},
        "training": {"max_steps": 3, "global_batch_size": 2, "micro_batch_size": 2, "log_every": 1,
                     "checkpoint_every": 100, "log_with": "none"},
        "data": recon_data(shapes, **data),
    }


def test_reconstruction_reads_images_from_every_image_layout(shapes, tmp_path):
    config = load_config(data=recon_recipe(shapes, tmp_path))
    assert TASKS[-1] == "reconstruction"
    dataset = MultiTaskDataset(config.data)
    assert dataset.task_size("reconstruction") == 3 * 12  # folder + caption layout + llava, the same 12 images
    sample = dataset[("reconstruction", 0, 0)]
    assert set(sample) == {"task", "draw", "pixels", "image_key"} and sample["pixels"].shape == (3, 64, 64)
    folder_first = dataset[("reconstruction", 0, 0)]
    caption_first = dataset[("reconstruction", 12, 0)]
    assert torch.equal(folder_first["pixels"], caption_first["pixels"])  # images/00000.png either way
    # so one latent-cache entry serves both (training.latent_cache_size): the file and the generation crop
    expected_key = ("generation", str(shapes / "images" / "00000.png"))
    assert folder_first["image_key"] == caption_first["image_key"] == expected_key


def test_reconstruction_sources_are_checked(shapes, tmp_path):
    with pytest.raises(ValidationError, match=r"data.reconstruction\[0\].folder: folder not found"):
        load_config(data=recon_recipe(shapes, tmp_path, reconstruction=[{"format": "images", "folder": "nope"}]))
    with pytest.raises(ValidationError, match=r"data.reconstruction\[0\].format: 'text' cannot feed reconstruction"):
        load_config(data=recon_recipe(shapes, tmp_path, reconstruction=[{"format": "text", "path": "text.jsonl"}]))
    with pytest.raises(ValidationError, match="data.ratios.reconstruction is 2 but data.reconstruction lists no source"):
        load_config(data=recon_recipe(shapes, tmp_path, reconstruction=[]))
    empty = tmp_path / "empty"
    empty.mkdir()
    config = load_config(data=recon_recipe(shapes, tmp_path, reconstruction=[{"format": "images", "folder": str(empty)}]))
    with pytest.raises(ValueError, match=f"no image .* under {empty}"):
        MultiTaskDataset(config.data)


@pytest.mark.parametrize("instruction", ["", "Keep the colours."])
def test_collator_builds_the_reconstruction_prompt(instruction):
    tokenizer = tiny_tokenizer()
    collator = HarmonCollator(
        tokenizer, image_token_id=IMAGE_ID, image_tokens=24,
        prompt_template=PromptTemplate(),
        generation_prefix="Generate an image: ", unconditional_prompt="Generate an image.",
        max_length=160, cfg_drop_prob=1.0, reconstruction_instruction=instruction,
    )
    samples = [{"task": "reconstruction", "draw": i, "pixels": torch.full((3, 8, 8), float(i))} for i in range(3)]
    batch = collator(samples)
    assert set(batch) == {"task", "pixels", "input_ids", "attention_mask"}
    assert batch["pixels"].shape == (3, 3, 8, 8) and torch.equal(batch["pixels"][2], samples[2]["pixels"])
    assert bool(batch["attention_mask"].all())
    row = batch["input_ids"][0].tolist()
    assert row.count(IMAGE_ID) == 24 and all(r.tolist() == row for r in batch["input_ids"])  # never dropped
    expected = "<|im_start|>user\nGenerate an image: " + "<image>" * 24
    expected += (f"\n{instruction}" if instruction else "") + "<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(row) == expected
    short = HarmonCollator(
        tokenizer, image_token_id=IMAGE_ID, image_tokens=24, prompt_template=collator.template,
        generation_prefix="Generate an image: ", unconditional_prompt="Generate an image.", max_length=30,
    )
    with pytest.raises(ValueError, match=r"data.max_length \(30\) cannot hold the reconstruction prompt"):
        short(samples)


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_reca_recipes_carry_the_reca_settings(size):
    config = load_config(CONFIGS / f"reca_harmon-{size}.yaml", check_files=False)
    assert config.data.ratios.as_dict() == {"text": 0, "image_to_text": 2, "text_to_image": 0, "reconstruction": 2}
    assert set(config.trainable_modules) >= {"encoder", "decoder", "head", "llm", "proj_in", "proj_out"}
    assert {config.module_lr(name) for name in config.trainable_modules} == {1e-5}
    assert config.optimizer.weight_decay == 0.02
    assert config.schedule.warmup_steps == config.training.max_steps // 100  # 1% warm-up
    assert config.model.pretrained is not None  # post-training starts from a trained model


def test_reca_toy_recipe_carries_the_reca_mix():
    config = load_config(CONFIGS / "reca_harmon-toy.yaml", check_files=False)
    assert config.data.ratios.as_dict() == {"text": 0, "image_to_text": 2, "text_to_image": 0, "reconstruction": 2}
    assert config.optimizer.weight_decay == 0.02
    assert config.schedule.warmup_steps == config.training.max_steps // 100
    assert config.model.pretrained is not None and len({config.module_lr(n) for n in config.trainable_modules}) == 1


@pytest.mark.parametrize("understanding", [None, "siglip-tiny"])
def test_reconstruction_task_trains(shapes, tmp_path, fresh_accelerate_state, understanding):
    from harmon.training.trainer import Trainer

    reset_accelerate_state()
    recipe = recon_recipe(shapes, tmp_path / "run")
    if understanding is not None:  # decoupled: the loss conditions on the understanding encoder's embeddings
        recipe["model"]["config_overrides"] = {"understanding_encoder": {"name": understanding,
                                                                         "config": {"image_size": 32}}}
    trainer = Trainer(load_config(data=recipe))
    encoder = trainer.model.encoder if understanding is None else trainer.model.understanding_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = trainer.train()
    losses = [r["loss/reconstruction"] for r in result.history if "loss/reconstruction" in r]
    assert result.step == 3 and losses and all(torch.isfinite(torch.tensor(losses)))
    assert any("loss/image_to_text" in r for r in result.history)
    after = encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
