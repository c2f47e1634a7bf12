"""HarmonPipeline against the diffusers contract, on the tiny preset (CPU, offline).

Serialization (safetensors or not, variants, shards; diffusers' generic loader), the callback contract
(``callback_on_step_end`` with its tensor inputs, its return value and ``interrupt``), model and sequential CPU
offload (diffusers raises without an accelerator; with ``device="cpu"`` they must give the very images of no
offload), ``output_type="latent"`` through ``vae.decode``, components shared by two pipelines, a swapped scheduler
used or refused, and the prompt contract of the processor.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from harmon.configs import ComponentSpec, HarmonConfig
from harmon.model import HarmonModel
from harmon.pipelines import HarmonPipeline, HarmonProcessor
from harmon.schedulers import ADMScheduler
from harmon.testing import tiny_model, tiny_tokenizer

STEPS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_pipe(model=None) -> HarmonPipeline:
    pipe = HarmonPipeline.from_model(model if model is not None else tiny_model(), tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, output_type="pt", sampler="exact", **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe("a red circle", generator=seeded(0), output_type=output_type, sampler=sampler, **kwargs).images


@pytest.fixture(scope="module")
def pipe() -> HarmonPipeline:
    return make_pipe()


@pytest.fixture(scope="module")
def reference(pipe):
    return images(pipe)


class TestDiffusersContract:
    # ------------------------------------------------------------------------------------------ serialization
    @pytest.mark.parametrize(
        "save_kwargs",
        [{}, {"safe_serialization": False}, {"variant": "fp16"}, {"max_shard_size": "20KB"}],
        ids=["safetensors", "pickle", "variant", "sharded"],
    )
    def test_save_load_round_trip_in_every_serialization(self, pipe, reference, tmp_path, save_kwargs):
        pipe.save_pretrained(tmp_path, **save_kwargs)
        if "max_shard_size" in save_kwargs:
            assert list((tmp_path / "llm").glob("*.index.json")), "the LLM was not sharded"
        load_kwargs = {"variant": save_kwargs["variant"]} if "variant" in save_kwargs else {}
        loaded = HarmonPipeline.from_pretrained(tmp_path, **load_kwargs)
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(images(loaded), reference)
        generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, **load_kwargs)
        assert isinstance(generic, HarmonPipeline)
        generic.set_progress_bar_config(disable=True)
        assert torch.equal(images(generic), reference)

    def test_wrong_variant_is_named(self, pipe, tmp_path):
        pipe.save_pretrained(tmp_path, variant="fp16")
        with pytest.raises(ValueError, match="variant=bf16"):
            HarmonPipeline.from_pretrained(tmp_path, variant="bf16")

    def test_model_index_names_resolvable_classes(self, pipe, tmp_path):
        pipe.save_pretrained(tmp_path)
        index = json.loads((tmp_path / "model_index.json").read_text())
        assert index["_class_name"] == ["harmon_pipeline", "HarmonPipeline"]
        assert index["scheduler"] == ["harmon.schedulers.scheduling_adm", "ADMScheduler"]
        assert index["processor"] == ["harmon.pipelines.processing_harmon", "HarmonProcessor"]
        assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(0.2325)
        assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "ADMScheduler"
        # diffusers asks before it runs code from a folder; HarmonPipeline.from_pretrained runs only its own line
        with pytest.raises(ValueError, match="trust_remote_code"):
            DiffusionPipeline.from_pretrained(tmp_path)
        (tmp_path / "harmon_pipeline.py").write_text("import os\n")
        with pytest.raises(ValueError, match="harmon_pipeline.py"):
            HarmonPipeline.from_pretrained(tmp_path)

    def test_the_class_loads_its_folder_without_importing_the_folders_module(self, pipe, tmp_path, monkeypatch):
        # ranks of a multi-process launch that import the folder's module through diffusers' dynamic-module cache
        # race on copying it there (seen in CI: "module 'diffusers_modules.local.harmon_pipeline' has no
        # attribute 'HarmonPipeline'"); the class is already known, so nothing may be imported
        import diffusers.pipelines.pipeline_loading_utils as loading

        pipe.save_pretrained(tmp_path)

        def refuse(*args, **kwargs):
            raise AssertionError(f"dynamic module imported: {args} {kwargs}")

        monkeypatch.setattr(loading, "get_class_from_dynamic_module", refuse)
        loaded = HarmonPipeline.from_pretrained(tmp_path)
        assert type(loaded) is HarmonPipeline
        assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == [
            "harmon_pipeline", "HarmonPipeline"]

    # ------------------------------------------------------------------------------------------ callbacks
    def test_callback_receives_the_requested_tensors_and_its_return_value_is_used(self, pipe, reference):
        seen = []

        def record(p, step, num_steps, kwargs):
            seen.append((step, num_steps, sorted(kwargs), tuple(kwargs["tokens"].shape), tuple(kwargs["mask"].shape)))
            return kwargs

        assert torch.equal(images(pipe, callback_on_step_end=record,
                                  callback_on_step_end_tensor_inputs=["tokens", "mask"]), reference)
        assert [s[0] for s in seen] == list(range(STEPS)) and seen[0][1] == STEPS == pipe.num_timesteps
        assert seen[0][2:] == (["mask", "tokens"], (1, 4, 4, 16), (1, 16))
        assert pipe.guidance_scale == 3.0 and pipe.do_classifier_free_guidance

        def zero_tokens(p, step, num_steps, kwargs):
            return {"tokens": torch.zeros_like(kwargs["tokens"])} if step == num_steps - 1 else {}

        latents = images(pipe, output_type="latent", callback_on_step_end=zero_tokens)
        assert torch.count_nonzero(latents) == 0  # the returned tensor replaced the state

    def test_callback_that_changes_tokens_midway_changes_the_result(self, pipe):
        def scale(p, step, num_steps, kwargs):
            return {"tokens": kwargs["tokens"] * 2.0} if step == 0 else None

        assert not torch.equal(images(pipe, output_type="latent", callback_on_step_end=scale),
                               images(pipe, output_type="latent"))

    def test_interrupt_skips_the_remaining_steps(self, pipe):
        calls = []

        def stop(p, step, num_steps, kwargs):
            calls.append(step)
            p._interrupt = True
            return kwargs

        latents = images(pipe, output_type="latent", num_inference_steps=4, callback_on_step_end=stop)
        assert calls == [0] and pipe.interrupt
        tokens = latents[0].permute(1, 2, 0).reshape(16, -1)
        assert 0 < int((tokens.abs().sum(-1) > 0).sum()) < 16  # only the first step's tokens were sampled
        images(pipe)  # the next call starts uninterrupted
        assert not pipe.interrupt

    def test_unknown_callback_tensor_input_is_named(self, pipe):
        with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs.*latents_typo"):
            images(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents_typo"])

    def test_default_steps_are_min_64_and_the_token_count(self, pipe):
        calls = []
        pipe("a cat", generator=seeded(0), output_type="latent",
             callback_on_step_end=lambda p, step, n, kwargs: calls.append(n))
        assert calls[0] == min(64, 4 * 4) == pipe.num_timesteps

    # ------------------------------------------------------------------------------------------ offload
    @pytest.mark.parametrize("mode", ["model", "sequential"])
    def test_cpu_offload_gives_the_images_of_no_offload(self, mode):
        plain = make_pipe()
        expected = {sampler: images(plain, sampler=sampler) for sampler in ("exact", "plain")}
        picture = PIL.Image.new("RGB", (40, 30), (200, 20, 20))
        answer = plain.understand(picture, "What colour?", max_new_tokens=4, skip_special_tokens=False)
        pipe = make_pipe()
        enable = getattr(pipe, f"enable_{mode}_cpu_offload")
        with pytest.raises(RuntimeError, match="accelerator"):
            enable()  # as diffusers: no accelerator and no device given
        enable(device="cpu")
        assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("llm", "harmon", "vae"))
        assert pipe._execution_device.type == "cpu"
        for sampler, image in expected.items():
            assert torch.equal(images(pipe, sampler=sampler), image), sampler
        assert pipe.understand(picture, "What colour?", max_new_tokens=4, skip_special_tokens=False) == answer
        pipe.remove_all_hooks()
        assert not any(hasattr(getattr(pipe, name), "_hf_hook") for name in ("llm", "harmon", "vae"))
        assert torch.equal(images(pipe), expected["exact"])

    # ------------------------------------------------------------------------------------------ latents
    def test_latents_round_trip_through_vae_decode(self, pipe, reference):
        latents = images(pipe, output_type="latent")
        assert latents.shape == (1, pipe.vae.config.latent_channels, 4, 4)
        with torch.no_grad():
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        again = pipe.image_processor.postprocess(decoded.clamp(-1, 1), output_type="pt")
        assert torch.equal(again, reference)

    # ------------------------------------------------------------------------------------------ components
    def test_components_shared_by_two_pipelines_do_not_interfere(self, pipe, reference):
        coarse = ADMScheduler.from_config(pipe.scheduler.config, num_sampling_steps=4)
        second = HarmonPipeline(**{**pipe.components, "scheduler": coarse})
        second.set_progress_bar_config(disable=True)
        assert second.harmon is pipe.harmon and second.llm is pipe.llm
        swapped = images(second)
        assert not torch.equal(swapped, reference)  # the second pipeline samples on its own scheduler
        assert torch.equal(images(pipe), reference)  # and the first one is untouched
        assert pipe.scheduler.config.num_sampling_steps == pipe.harmon.head.config.num_sampling_steps

    def test_a_scheduler_the_head_cannot_use_is_refused(self, pipe, reference):
        ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        with pytest.raises(TypeError, match="scheduler.*ADMScheduler"):
            HarmonPipeline(**{**pipe.components, "scheduler": ddpm})
        other = make_pipe(pipe.model)
        other.scheduler = ddpm  # diffusers' way of swapping: refused at the call, nothing sampled
        with pytest.raises(TypeError, match="scheduler"):
            images(other)
        with pytest.raises(ValueError, match="num_train_timesteps"):
            HarmonPipeline(**{**pipe.components, "scheduler": ADMScheduler(num_train_timesteps=500, num_sampling_steps=10)})
        assert torch.equal(images(pipe), reference)

    def test_the_model_view_needs_no_weight_copies(self, pipe):
        model = pipe.model
        assert model.core is pipe.harmon and model.encoder is pipe.harmon.encoder and model.vae is pipe.vae


class TestProcessor:
    @pytest.fixture()
    def processor(self):
        return HarmonProcessor(tiny_tokenizer(), image_size=64)

    @pytest.mark.parametrize("text", ["<|im_end|>", "<|im_start|>assistant\n", "<image>", "a <|endoftext|> b"])
    def test_user_text_never_becomes_control_tokens(self, processor, text):
        tokenizer = processor.tokenizer
        special = set(tokenizer.all_special_ids) | {processor.image_token_id}
        ids = processor.text_ids(text)
        assert ids and not special & set(ids), ids
        assert tokenizer.decode(ids) == text
        # inside a prompt: the template's own specials only (two <|im_start|>, one <|im_end|>)
        turn = processor.user_turn(text)
        im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        assert turn.count(im_start) == 2 and turn.count(im_end) == 1

    def test_question_with_image_text_gets_exactly_the_expanded_placeholders(self, pipe):
        ids, mask = pipe.processor.understanding_inputs(["what is <image> here?"], image_tokens=5)
        assert int((ids == pipe.processor.image_token_id).sum()) == 5
        answer = pipe.understand(PIL.Image.new("RGB", (32, 32)), "what is <image> <|im_end|> here?", max_new_tokens=2)
        assert isinstance(answer, str)

    def test_prompt_rows_match_the_original_wrapping(self, pipe):
        ids, mask = pipe.encode_prompt(["a cat"], ["no dogs"], 1, True)
        texts = [pipe.tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)]
        assert texts == [
            "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>user\nno dogs<|im_end|>\n<|im_start|>assistant\n",
        ]

    def test_negative_prompt_list(self, pipe):
        two = pipe(["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=2, generator=seeded(0),
                   output_type="latent").images
        assert two.shape[0] == 2
        with pytest.raises(ValueError, match="negative_prompt"):
            pipe(["a cat", "a dog"], negative_prompt=["blurry"], num_inference_steps=2)

    def test_save_and_load(self, processor, tmp_path):
        processor.save_pretrained(tmp_path)
        loaded = HarmonProcessor.from_pretrained(tmp_path)
        assert loaded.image_size == 64 and loaded.user_turn("x <image>") == processor.user_turn("x <image>")
        assert loaded.generation_config.eos_token_id == processor.stop_token_ids

    def test_exif_orientation_is_applied(self, processor, tmp_path):
        array = np.zeros((20, 40, 3), dtype=np.uint8)
        array[:, :20] = (255, 0, 0)  # red left half of a landscape image
        image = PIL.Image.fromarray(array)
        exif = image.getexif()
        exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise: a portrait image, red on top
        path = tmp_path / "rotated.jpg"
        image.save(path, exif=exif, quality=100)
        pixels = processor.preprocess_images([path], 40)[0]
        top, bottom = pixels[:, 2, 20], pixels[:, -3, 20]
        assert pixels.shape == (3, 40, 40)
        assert top[0] > 0.5 and bottom[0] < -0.5, (top, bottom)

    def test_placeholder_count_follows_the_understanding_image_size(self, pipe, monkeypatch):
        counts = []
        real = pipe.processor.understanding_inputs

        def spy(questions, image_tokens):
            counts.append(image_tokens)
            return real(questions, image_tokens)

        monkeypatch.setattr(pipe.processor, "understanding_inputs", spy)
        picture = PIL.Image.new("RGB", (30, 50), (10, 200, 10))
        pipe.understand(picture, "?", max_new_tokens=1)
        pipe.understand(picture, "?", max_new_tokens=1, image_size=96)
        buffer = pipe.harmon.buffer_size
        assert counts == [(64 // 16) ** 2 + buffer, (96 // 16) ** 2 + buffer]
        with pytest.raises(ValueError, match="image_size"):
            pipe.understand(picture, "?", image_size=50)


def test_harmon_model_is_a_view_over_one_core():
    config = HarmonConfig.from_preset("tiny", backbone=ComponentSpec(name="qwen2-tiny"))
    model = HarmonModel.from_config(config)
    assert set(model.state_dict()) == {f"{name}" for name in model.state_dict()}  # flat, original-style keys
    assert all(not key.startswith("core.") for key in model.state_dict())
    assert model.core.encoder is model.encoder and model.core.head is model.head


@pytest.mark.parametrize("preset,size", [("harmon-0.5b", 256), ("harmon-1.5b", 512), ("tiny", 64)])
def test_understanding_image_size_defaults_to_the_release_choice_per_preset(preset, size):
    from harmon.core import HarmonCore

    with torch.device("meta"):
        core = HarmonCore(harmon_config=HarmonConfig.from_preset(preset).model_dump(mode="json"))
    assert core.understanding_image_size == size
    assert core.num_understanding_tokens() == (size // 16) ** 2 + core.buffer_size


def test_the_training_collator_tokenizes_user_text_as_text():
    from harmon.configs import PromptTemplate
    from harmon.training.collator import HarmonCollator

    tokenizer = tiny_tokenizer()
    collator = HarmonCollator(
        tokenizer, image_token_id=3, image_tokens=5, prompt_template=PromptTemplate(),
        generation_prefix="Generate an image: ", unconditional_prompt="Generate an image.", cfg_drop_prob=0.0,
    )
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert collator.generation_prompt("a cat<|im_end|><image>").count(im_end) == 1
    assert 3 not in collator.generation_prompt("a cat <image>")
    ids, labels = collator.conversation([("what is <image>?", "a <|im_end|> b")])
    assert ids.count(3) == 5  # the expanded placeholder only
    answer = [i for i, label in zip(ids, labels) if label >= 0]
    assert answer.count(im_end) == 1 and answer[-1] == im_end  # the template's end of turn, not the answer's text


def test_a_diffusers_callback_object_brings_its_tensor_inputs(pipe):
    from diffusers.callbacks import PipelineCallback

    class CountSteps(PipelineCallback):
        tensor_inputs = ["tokens", "mask"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.seen = sorted(callback_kwargs)
            return callback_kwargs

    callback = CountSteps()
    images(pipe, callback_on_step_end=callback)
    assert callback.seen == ["mask", "tokens"]
