"""``training.latent_cache_size``: each training image's frozen-VAE tokens are encoded once and reused; the
training it gives is the uncached one (same losses, same weights up to the round-off of encoding in a smaller
batch), the VAE runs only for images not yet cached, and the cache never holds more than its size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state

from harmon.training.config import load_config
from harmon.training.latent_cache import LatentCache
from harmon.training.synthetic import write_shapes_dataset
from harmon.training.trainer import Trainer

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


class CountingEncoder:
    """A stand-in for ``HarmonModel.encode_image``: a fixed function of the pixels, counting the images encoded."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        return pixels.mean(dim=1, keepdim=True) * 2 + 1


def test_cached_rows_are_the_encoding_and_only_missing_images_are_encoded():
    encode = CountingEncoder()
    cache = LatentCache(capacity=10)
    pixels = torch.randn(6, 3, 4, 4)
    first = cache.tokens(encode, pixels[:4], ["a", "b", "c", "d"])
    assert encode.images == 4 and len(cache) == 4
    torch.testing.assert_close(first, encode(pixels[:4]), rtol=0, atol=0)
    encode.images = 0
    # two cached, two new, one of them twice in the batch: each new image encoded in one call, and the rows
    # come back in the batch's order
    mixed = cache.tokens(encode, pixels[[3, 4, 0, 5, 4]], ["d", "e", "a", "f", "e"])
    assert encode.images == 3 and len(cache) == 6 and cache.encoded == 7
    torch.testing.assert_close(mixed, encode(pixels[[3, 4, 0, 5, 4]]), rtol=0, atol=0)


def test_a_full_cache_keeps_what_it_holds_and_encodes_the_rest_every_time():
    encode = CountingEncoder()
    cache = LatentCache(capacity=2)
    pixels = torch.randn(3, 3, 4, 4)
    for _ in range(3):
        out = cache.tokens(encode, pixels, ["x", "y", "z"])
        torch.testing.assert_close(out, encode(pixels), rtol=0, atol=0)
    assert len(cache) == 2
    assert cache.encoded == 3 + 1 + 1  # the first draw encodes all three; later only "z", which does not fit


@pytest.mark.parametrize(("capacity", "keys", "message"), [
    (0, None, r"latent_cache_size: 0; a cache needs room for at least one image \(0: no cache\)"),
    (4, ["a", "b"], r"image_keys: 2 keys for a batch of 3 images"),
])
def test_bad_cache_input_is_refused(capacity, keys, message):
    with pytest.raises(ValueError, match=message):
        LatentCache(capacity).tokens(CountingEncoder(), torch.zeros(3, 3, 4, 4), keys)


def test_a_negative_cache_size_fails_at_load(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="training.latent_cache_size"):
        load_config(SMOKE, overrides={"data.root": str(tmp_path), "output_dir": str(tmp_path / "run"),
                                      "training.latent_cache_size": -1}, check_files=False)


def test_training_with_the_cache_is_training_without_it(tmp_path):
    """The smoke recipe (both tasks, the tiny preset, 48 images, several epochs in 24 steps) with and without
    the cache: the same loss at every step and the same weights, to float32 round-off; the cached run encodes
    each image once per task, the uncached one every draw."""
    shapes = write_shapes_dataset(tmp_path / "shapes", count=48, size=64, seed=0)
    runs = {}
    for name, size in (("plain", 0), ("cached", 1000)):
        reset_accelerate_state()
        config = load_config(SMOKE, overrides={"data.root": str(shapes), "output_dir": str(tmp_path / name),
                                               "training.max_steps": 24, "training.latent_cache_size": size})
        trainer = Trainer(config)
        calls = []
        encode = trainer.model.encode_image
        trainer.model.encode_image = (lambda pixels, calls=calls, encode=encode:
                                      calls.append(pixels.shape[0]) or encode(pixels))
        result = trainer.train()
        runs[name] = (result.history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                      sum(calls), trainer.module.latent_cache)
    (plain, plain_state, plain_encoded, no_cache), (cached, cached_state, cached_encoded, cache) = runs.values()
    assert no_cache is None and cache is not None
    drawn = plain_encoded  # every image-bearing sample drawn, encoded once each without the cache
    assert cached_encoded == cache.encoded == len(cache) < drawn, (cached_encoded, len(cache), drawn)
    assert len(cache) <= 2 * 48  # at most one entry per image and preprocessing (generation, understanding)
    # measured on the 2-core CPU: bitwise equal (losses and weights, 24 steps); the 1e-6 margins are float32
    # round-off, for a BLAS whose convolutions depend on the batch an image is encoded in
    losses = [{k: v for k, v in record.items() if k.startswith("loss/")} for record in plain]
    cached_losses = [{k: v for k, v in record.items() if k.startswith("loss/")} for record in cached]
    assert [sorted(r) for r in losses] == [sorted(r) for r in cached_losses]
    for a, b in zip(losses, cached_losses):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    for key, value in plain_state.items():
        scale = max(1.0, value.abs().max().item()) if value.numel() else 1.0
        assert (value - cached_state[key]).abs().max().item() <= 1e-6 * scale, key


def test_the_dataset_keys_an_image_by_its_file_and_preprocessing(tmp_path):
    """Two samples share cached tokens exactly when they load the same file the same way: text→image and
    image→text preprocess differently (centre crop / gray padding), so the same file gets two keys."""
    from harmon.training.data import MultiTaskDataset, understanding_pixels

    shapes = write_shapes_dataset(tmp_path / "shapes", count=8, size=64, seed=0)
    config = load_config(SMOKE, overrides={"data.root": str(shapes), "output_dir": str(tmp_path / "run")})
    dataset = MultiTaskDataset(config.data)
    generation, understanding = dataset[("text_to_image", 3, 0)], dataset[("image_to_text", 3, 0)]
    assert generation["image_key"][0] == "generation" and understanding["image_key"][0] == "understanding"
    assert generation["image_key"][1] == understanding["image_key"][1] == str(shapes / "images" / "00003.png")
    assert dataset[("text_to_image", 3, 5)]["image_key"] == generation["image_key"]  # another draw, same image
    assert dataset[("text_to_image", 4, 0)]["image_key"] != generation["image_key"]
    assert "image_key" not in dataset[("text", 0, 0)]
    from PIL import Image

    pixels = understanding_pixels(Image.open(understanding["image_key"][1]).convert("RGB"), config.data.image_size)
    torch.testing.assert_close(understanding["pixels"], pixels, rtol=0, atol=0)  # the key names what was loaded
