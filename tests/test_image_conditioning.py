"""Image-conditioned generation (RecA's inference side): ``pipe(image=..., prompt=None | str)`` on the tiny model —
the prompt rows and embeddings against a hand assembly, the embedded prefill against the token prefill, seeded
reproducibility, output types, callbacks, validation, a decoupled encoder, and ``harmon generate --image``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from harmon.configs import ComponentSpec
from harmon.core import embed_text, prefill
from harmon.image_conditioning import image_generation_rows, prefill_embeddings
from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 2


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe() -> HarmonPipeline:
    pipe = HarmonPipeline.from_model(tiny_model(seed=3), tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_rows_put_the_image_where_the_caption_goes(pipe):
    processor = pipe.processor
    ids, mask = image_generation_rows(processor, [None, "Keep the colours."], 5, None, 2, True)
    assert ids.shape[0] == 8 and mask.shape == ids.shape  # 2 images × 2, then their unconditional rows
    texts = [processor.decode(row[m.bool()]) for row, m in zip(ids, mask)]
    image = "<image>" * 5
    assert texts[0] == texts[1] == f"<|im_start|>user\nGenerate an image: {image}<|im_end|>\n<|im_start|>assistant\n"
    assert texts[2] == texts[3] == (
        f"<|im_start|>user\nGenerate an image: {image}\nKeep the colours.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert set(texts[4:]) == {"<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"}
    assert bool((ids[~mask.bool()] == processor.tokenizer.eos_token_id).all())  # right padding with EOS
    # a user's instruction is text: a "<image>" typed in it is not a placeholder
    typed, _ = image_generation_rows(processor, ["<image>"], 5, None, 1, False)
    assert int((typed == processor.image_token_id).sum()) == 5


def test_image_prompt_embeddings_hold_the_understanding_embeddings(pipe):
    image = picture(0)
    input_ids, attention_mask, embeds = pipe.encode_image_prompt([image], ["Keep it."], None, 2, True)
    understanding = pipe.image_embeddings([image])
    placeholders = input_ids == pipe.processor.image_token_id
    assert placeholders[:2].sum(dim=1).tolist() == [understanding.shape[1]] * 2 and not placeholders[2:].any()
    for row in range(2):
        assert torch.equal(embeds[row][placeholders[row]], understanding[0])
    text = embed_text(pipe.llm, input_ids)
    assert torch.equal(embeds[~placeholders], text[~placeholders])


def test_the_embedded_prefill_equals_the_token_prefill(pipe):
    input_ids, _ = pipe.processor.generation_inputs(["a red circle", "two blue squares"], None, 1, True)
    by_ids = prefill(pipe.llm, input_ids)
    by_embeds = prefill_embeddings(pipe.llm, embed_text(pipe.llm, input_ids))
    assert by_ids.get_seq_length() == by_embeds.get_seq_length()
    for a, b in zip(by_ids.layers, by_embeds.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_generation_from_an_image_is_seeded_and_follows_image_and_instruction(pipe):
    image = picture(1)
    run = lambda **kw: pipe(image=kw.pop("image", image), num_inference_steps=STEPS, output_type="pt", **kw).images  # noqa: E731
    first, again = run(generator=seeded(0)), run(generator=seeded(0))
    assert first.shape == (1, 3, 64, 64) and torch.equal(first, again)
    assert not torch.equal(first, run(generator=seeded(1)))
    assert not torch.equal(first, run(generator=seeded(0), image=picture(2)))  # the image conditions it
    assert not torch.equal(first, run(generator=seeded(0), prompt="Keep the colours."))
    # not the text path: the placeholders carry the image, not their own embeddings
    text = pipe("Keep the colours.", num_inference_steps=STEPS, output_type="pt", generator=seeded(0)).images
    assert not torch.equal(first, text)


def test_image_generation_has_the_text_paths_output_types_and_callbacks(pipe):
    images = [picture(4), picture(5, (48, 80))]  # any size: padded to a square for understanding
    steps = []

    def callback(p, step, total, state):
        steps.append((step, total, tuple(state["tokens"].shape), tuple(state["mask"].shape)))
        return None

    pil = pipe(image=images, prompt=["Keep it.", None], num_images_per_prompt=2, num_inference_steps=STEPS,
               generator=[seeded(i) for i in range(4)], callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["tokens", "mask"]).images
    assert len(pil) == 4 and all(isinstance(i, PIL.Image.Image) and i.size == (64, 64) for i in pil)
    assert steps == [(s, STEPS, (4, 4, 4, 16), (4, 16)) for s in range(STEPS)]
    for output_type, shape in (("np", (1, 64, 64, 3)), ("pt", (1, 3, 64, 64)), ("latent", (1, 16, 4, 4))):
        out = pipe(image=images[0], num_inference_steps=STEPS, generator=seeded(0), output_type=output_type).images
        assert tuple(out.shape) == shape, output_type
    as_tuple = pipe(image=images[0], num_inference_steps=STEPS, generator=seeded(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[0]) == 1


def test_image_generation_validates_its_arguments(pipe):
    image = picture(0)
    with pytest.raises(ValueError, match="prompt: got 1 instructions for 2 images"):
        pipe(image=[image, image], prompt=["a"], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="image: the list of images is empty"):
        pipe(image=[], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"prompt: instruction\(s\) \[0\] are empty"):
        pipe(image=image, prompt="  ", num_inference_steps=STEPS)
    with pytest.raises(TypeError, match="prompt must be None, a string or a list of strings"):
        pipe(image=image, prompt=3, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="image: give either image or prompt_input_ids"):
        ids = torch.ones(2, 3, dtype=torch.long)
        pipe(image=image, prompt_input_ids=ids, prompt_attention_mask=ids, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="negative_prompt: give one string, or one per image"):
        pipe(image=[image, image], negative_prompt=["x"], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="generator: got a list of 1 generators for 2 images"):
        pipe(image=image, num_images_per_prompt=2, generator=[seeded(0)], num_inference_steps=STEPS)
    with pytest.raises(FileNotFoundError, match="image: no such image file"):
        pipe(image="/nonexistent.png", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        pipe(image=image, num_inference_steps=0)


def test_a_decoupled_pipeline_conditions_on_its_own_understanding_encoder():
    spec = ComponentSpec(name="siglip-tiny", config={"image_size": 32})
    pipe = HarmonPipeline.from_model(tiny_model(seed=3, understanding_encoder=spec), tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    input_ids, _, embeds = pipe.encode_image_prompt([picture(0)], [None], None, 1, True)
    assert int((input_ids[0] == pipe.processor.image_token_id).sum()) == 4  # SigLIP's 2×2 features at 32 px
    features = pipe.image_embeddings([picture(0)])
    assert torch.equal(embeds[0][input_ids[0] == pipe.processor.image_token_id], features[0])
    out = pipe(image=picture(0), num_inference_steps=STEPS, generator=seeded(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64)


def test_cli_generate_from_images(pipe, tmp_path, capsys):
    from harmon.cli import main

    folder = tmp_path / "pipe"
    pipe.save_pretrained(str(folder))
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"in{i}.png")
        picture(i).save(paths[-1])
    out = tmp_path / "out"
    args = ["generate", str(folder), "--image", str(paths[0]), "--image", str(paths[1]), "--prompt", "Keep it.",
            "--out", str(out), "--steps", str(STEPS), "--num-images", "2", "--device", "cpu"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]
    expected = pipe(image=str(paths[1]), prompt="Keep it.", num_images_per_prompt=2, num_inference_steps=STEPS,
                    generator=[seeded(2), seeded(3)]).images  # seeds: seed + index·num_images + k
    assert np.array_equal(np.asarray(PIL.Image.open(out / "00001_1.png")), np.asarray(expected[1]))
    capsys.readouterr()
    assert main(["generate", str(folder), "--image", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "--image: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--prompt: give one instruction for all images or one per image \(2\)"):
        main(["generate", str(folder), "--image", str(paths[0]), "--image", str(paths[1]), "--prompt", "a",
              "--prompt", "b", "--prompt", "c", "--out", str(out)])


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_image_generation_under_cpu_offload_gives_the_images_of_no_offload(pipe, mode):
    image = picture(6)
    expected = pipe(image=image, prompt="Keep it.", num_inference_steps=STEPS, generator=seeded(0),
                    output_type="pt").images
    offloaded = HarmonPipeline.from_model(tiny_model(seed=3), tiny_tokenizer())  # the same weights, its own modules
    offloaded.set_progress_bar_config(disable=True)
    getattr(offloaded, f"enable_{mode}_cpu_offload")(device="cpu")
    out = offloaded(image=image, prompt="Keep it.", num_inference_steps=STEPS, generator=seeded(0),
                    output_type="pt").images
    assert torch.equal(out, expected)
