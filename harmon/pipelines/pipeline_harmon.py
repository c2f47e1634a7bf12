"""``HarmonPipeline``: text → image and image → text with one Harmon model, as a diffusers pipeline."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harmon.checkpoints import IncompleteFolderError, check_pipeline_folder, read_json_file
from harmon.encoders.common import fail_fast_for_hub_id, saved_weights_follow
from harmon.model import GUIDANCE_SCHEDULES, SAMPLERS, HarmonModel
from harmon.pipelines.core import HarmonCore
from harmon.pipelines.image_processing import ImageInput, postprocessor, preprocess_for_understanding
from harmon.validation import check_generation_arguments, check_understanding_arguments

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
IMAGE_TOKEN = "<image>"
MAX_IMAGE_SIDE = 4096

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from harmon import HarmonPipeline

        >>> pipe = HarmonPipeline.from_pretrained("path/to/harmon-1.5b", dtype=torch.bfloat16).to("cuda")
        >>> generator = torch.Generator("cuda").manual_seed(0)
        >>> image = pipe("a red fox in the snow", generator=generator).images[0]
        >>> pipe.understand(image, "What animal is this?")
        ```
"""


class HarmonPipeline(DiffusionPipeline):
    r"""Text-to-image generation and image understanding with Harmon (arXiv 2503.21979).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the LLM's tokenizer (Qwen chat tokens and an
            ``<image>`` placeholder token).
        llm ([`~transformers.PreTrainedModel`]): the causal LLM (``Qwen2ForCausalLM``).
        harmon ([`HarmonCore`]): MAR encoder, MAR decoder, diffusion head and connectors (and, decoupled, the
            understanding encoder with its own connector; shared, the MAR encoder serves understanding too).
        vae ([`~diffusers.AutoencoderKL`]): the KL-16 image tokenizer.
        scheduler ([`~diffusers.DDPMScheduler`]): the diffusion head's noise schedule (ADM cosine, learned range).
    """

    model_cpu_offload_seq = "llm->harmon->vae"
    _optional_components: list[str] = []

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        llm: PreTrainedModel,
        harmon: HarmonCore,
        vae: AutoencoderKL,
        scheduler: DDPMScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, llm=llm, harmon=harmon, vae=vae, scheduler=scheduler)
        harmon.head.set_scheduler(scheduler)
        self.image_processor = postprocessor()

    # ------------------------------------------------------------------------------------------ construction
    @property
    def model(self) -> HarmonModel:
        """A :class:`HarmonModel` view over the pipeline's components (same module objects, nothing copied)."""
        cached = self.__dict__.get("_model_view")
        parts = (self.harmon, self.llm, self.vae)
        if cached is None or cached[0] != tuple(map(id, parts)):
            core = self.harmon
            model = HarmonModel(
                core.harmon, vae=self.vae, encoder=core.encoder, decoder=core.decoder, head=core.head,
                llm=self.llm, proj_in=core.proj_in, proj_out=core.proj_out,
                understanding_encoder=core.understanding_encoder, understanding_proj_in=core.understanding_proj_in,
            ).eval()
            cached = (tuple(map(id, parts)), model)
            self.__dict__["_model_view"] = cached
        return cached[1]

    @classmethod
    def from_model(
        cls, model: HarmonModel, tokenizer: PreTrainedTokenizerBase, scheduler: DDPMScheduler | None = None
    ) -> "HarmonPipeline":
        """A pipeline sharing ``model``'s modules (no copy)."""
        with saved_weights_follow():  # every module of this core is replaced by the model's right below
            core = HarmonCore(harmon_config=model.config.model_dump(mode="json"))
        core.encoder, core.decoder, core.head = model.encoder, model.decoder, model.head
        core.proj_in, core.proj_out = model.proj_in, model.proj_out
        core.understanding_encoder = model.understanding_encoder
        core.understanding_proj_in = model.understanding_proj_in
        _check_tokenizer(tokenizer)
        return cls(
            tokenizer=tokenizer, llm=model.llm, harmon=core, vae=model.vae,
            scheduler=scheduler if scheduler is not None else model.head.scheduler,
        )

    @classmethod
    def from_original(
        cls,
        harmon_checkpoint: str | os.PathLike,
        vae_checkpoint: str | os.PathLike,
        llm_folder: str | os.PathLike,
        *,
        original_config: str | os.PathLike | dict | None = None,
        preset: str | None = None,
        attn_implementation: str = "auto",
    ) -> "HarmonPipeline":
        """Convert the original release (``harmon_*.pth``, ``kl16.ckpt``, a Qwen folder with its tokenizer)."""
        from transformers import AutoTokenizer

        from harmon.conversion import load_original_harmon

        model = load_original_harmon(
            harmon_checkpoint, vae_checkpoint, llm_folder, original_config=original_config, preset=preset,
            attn_implementation=attn_implementation,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(llm_folder))
        return cls.from_model(model, tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "HarmonPipeline":
        """Load a saved pipeline folder (``dtype=``, ``attn_implementation=`` accepted).

        Only local folders are read here; a hub id fails fast when the hub cannot be reached. Core weights are
        checked strictly: missing, unexpected and mis-shaped keys are named.
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            _fail_for_unreachable_hub_id(str(pretrained_model_name_or_path))
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        # every component strictly, before loading (harmon.checkpoints): transformers would re-initialise a
        # missing LLM tensor and build a tokenizer from nothing; errors name the file and the keys
        check_pipeline_folder(path, cls.__name__, list(inspect.signature(cls.__init__).parameters)[1:],
                              build={"harmon": _meta_core})
        attn_implementation = kwargs.pop("attn_implementation", None)
        if "torch_dtype" in kwargs:  # diffusers' older spelling
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        with saved_weights_follow():  # the saved core holds its encoders' weights: no pretrained re-load
            pipe = super().from_pretrained(str(path), **kwargs)
        if attn_implementation is not None:
            pipe.set_attn_implementation(attn_implementation)
        return pipe

    # ------------------------------------------------------------------------------------------ offloading
    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep components on the CPU and move each phase's components to ``device`` only while it runs.

        Harmon calls its components many times per image (every MAR step runs the encoder, the LLM, the decoder
        and the head), so accelerate's per-forward hooks would shuttle the LLM between devices at every step.
        Offloading here is per phase instead, in the order ``model_cpu_offload_seq`` (llm → harmon → vae):
        sampling holds the LLM and the Harmon core, decoding only the VAE; understanding holds the VAE and the
        core, then the LLM and the core.
        """
        device = torch.device(device if device is not None else "cuda")
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, gpu_id or 0)
        self._harmon_offload_device = device
        self._place()

    def disable_model_cpu_offload(self) -> None:
        self.__dict__.pop("_harmon_offload_device", None)

    @property
    def _execution_device(self) -> torch.device:
        offload_device = self.__dict__.get("_harmon_offload_device")
        return offload_device if offload_device is not None else super()._execution_device

    def _place(self, *active: str) -> None:
        """With offloading on: ``active`` components on the execution device, every other one on the CPU."""
        device = self.__dict__.get("_harmon_offload_device")
        if device is None:
            return
        names = self.model_cpu_offload_seq.split("->")
        for name in sorted(names, key=lambda n: n in active):  # free memory before filling it
            getattr(self, name).to(device if name in active else torch.device("cpu"))

    def maybe_free_model_hooks(self) -> None:
        self._place()
        super().maybe_free_model_hooks()

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """``sdpa`` | ``eager`` | ``flash_attention_2`` | ``auto`` (flash-attn 2 on CUDA when installed)."""
        from harmon.backbones.qwen import resolve_attn_implementation

        self.llm.set_attn_implementation(resolve_attn_implementation(attn_implementation, self.device))

    # ------------------------------------------------------------------------------------------ validation
    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | None,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_schedule: str,
        temperature: float,
        num_images_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        sampler: str = "exact",
        head_steps: int | None = None,
    ) -> list[str]:
        """Validate the arguments of ``__call__``; return the prompts as a list."""
        if prompt is None:
            raise ValueError("prompt: give a prompt string or a non-empty list of prompt strings")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("prompt: the list of prompts is empty")
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            raise ValueError(f"prompt: prompt(s) {empty} are empty")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        stride = self.model.config.latent_stride
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value % stride or not stride <= value <= MAX_IMAGE_SIDE:
                raise ValueError(f"{name} must be a multiple of {stride} in [{stride}, {MAX_IMAGE_SIDE}], got {value}")
        num_tokens = (height // stride) * (width // stride)
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_tokens:
            raise ValueError(
                f"num_inference_steps must be an int between 1 and the image's {num_tokens} tokens, "
                f"got {num_inference_steps!r}"
            )
        if guidance_scale < 1:
            raise ValueError(
                f"guidance_scale must be >= 1 (1 disables guidance; a negative prompt needs guidance_scale > 1), "
                f"got {guidance_scale}"
            )
        if negative_prompt is not None and guidance_scale == 1:
            raise ValueError("guidance_scale: a negative_prompt has no effect with guidance_scale == 1")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        images = len(prompts) * num_images_per_prompt
        if isinstance(generator, (list, tuple)) and len(generator) != images:
            raise ValueError(
                f"generator: got a list of {len(generator)} generators for {images} images "
                f"({len(prompts)} prompts × {num_images_per_prompt} per prompt)"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if head_steps is not None:
            if sampler != "fast":
                raise ValueError(f"head_steps applies to sampler='fast' only (got sampler={sampler!r})")
            configured = self.model.head.sample_diffusion.num_timesteps
            if not isinstance(head_steps, int) or isinstance(head_steps, bool) or not 1 <= head_steps < configured:
                raise ValueError(
                    f"head_steps must be an int between 1 and the head's {configured} sampling steps (exclusive), "
                    f"got {head_steps!r}"
                )
        return list(prompts)

    # ------------------------------------------------------------------------------------------ prompts
    def _chat(self, text: str) -> str:
        return self.model.config.prompt_template.instruction.format(input=text)

    def _tokenize_right_padded(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer.encode(text, add_special_tokens=True) for text in texts]
        length = max(len(row) for row in rows)
        pad_id = self.tokenizer.eos_token_id  # the original pads prompts with the EOS id
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompt: str | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        num_image_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-wrapped prompt rows ``[cond…; uncond…]`` (right-padded with EOS) and their attention mask.

        Conditional rows are ``"Generate an image: " + prompt`` in the chat template, each repeated
        ``num_images_per_prompt`` times; the unconditional rows hold ``negative_prompt`` (default: the
        original's ``"Generate an image."``)."""
        config = self.model.config
        cond = [self._chat(config.generation_prefix + p) for p in prompts for _ in range(num_images_per_prompt)]
        texts = list(cond)
        if do_classifier_free_guidance:
            texts += [self._chat(negative_prompt or config.unconditional_prompt)] * len(cond)
        input_ids, attention_mask = self._tokenize_right_padded(texts)
        limit = self.llm.config.max_position_embeddings
        needed = input_ids.shape[1] + num_image_tokens + self.model.buffer_size
        if needed > limit:
            raise ValueError(
                f"prompt: {input_ids.shape[1]} prompt tokens + {num_image_tokens + self.model.buffer_size} image "
                f"tokens exceed the LLM context of {limit} positions; shorten the prompt or the image"
            )
        return input_ids.to(self._execution_device), attention_mask.to(self._execution_device)

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 64,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["HarmonPipeline", int, int, dict], dict | None] | None = None,
        sampler: str = "exact",
        head_steps: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: the prompt or prompts (wrapped as the original: ``"Generate an image: " + prompt`` in the
                Qwen chat template).
            negative_prompt: the unconditional prompt for classifier-free guidance (default
                ``"Generate an image."``).
            height, width: output size in pixels, multiples of 16 (default: the model's image size; non-square
                allowed).
            num_inference_steps: masked-autoregressive steps (each predicts at least one token).
            guidance_scale: classifier-free guidance on the diffusion head's ε (1 disables it).
            guidance_schedule: ``"constant"`` or ``"linear"`` (grows from 1 with the share of tokens generated).
            temperature: scales the diffusion head's sampling noise.
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` or one per image; the same seeds give the same images.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (``[0, 1]``) or ``"latent"`` (tokens ``(B, m, n, C)``).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: ``callback(pipe, step, num_steps, {"tokens": tokens})`` after each step.
            sampler: ``"exact"`` (default: the fused sampler, the plain one's samples to float round-off),
                ``"plain"`` (the straightforward loop, to compare against) or ``"fast"`` (fewer denoising steps
                in the diffusion head: faster, slightly different samples; see ``docs/performance.md``).
            head_steps: the diffusion head's denoising steps for ``sampler="fast"`` (default: a quarter of the
                configured ones).
        """
        check_generation_arguments(  # types, finiteness and the batch limit (harmon.validation), before any work
            prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale, temperature=temperature,
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
            generator=generator, callback_on_step_end=callback_on_step_end,
        )
        config = self.model.config
        height = height if height is not None else config.image_size
        width = width if width is not None else config.image_size
        prompts = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_schedule,
            temperature, num_images_per_prompt, generator, output_type, sampler, head_steps,
        )
        m, n = self.model.latent_grid(height, width)
        guided = guidance_scale > 1
        input_ids, attention_mask = self.encode_prompt(
            prompts, negative_prompt, num_images_per_prompt, guided, num_image_tokens=m * n
        )

        def on_step(step: int, total: int, tokens: torch.Tensor) -> None:
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, total, {"tokens": tokens})

        self._place("llm", "harmon")
        tokens = self.model.generate_tokens(
            input_ids,
            attention_mask,
            image_shape=(m, n),
            num_steps=num_inference_steps,
            guidance_scale=guidance_scale if guided else 1.0,
            guidance_schedule=guidance_schedule,
            temperature=temperature,
            generator=generator,
            progress=lambda steps: self.progress_bar(steps),
            callback=on_step,
            sampler=sampler,
            head_steps=head_steps,
        )
        if output_type == "latent":
            images = tokens
        else:
            self._place("vae")
            images = self.image_processor.postprocess(self.model.decode_tokens(tokens).float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------------------------------ understanding
    @torch.no_grad()
    def understand(
        self,
        image: ImageInput | Sequence[ImageInput],
        question: str | Sequence[str],
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        skip_special_tokens: bool = True,
    ) -> str | list[str]:
        """Answer ``question`` about ``image`` (one of each, or equal-length lists for a batch → a list).

        Images are padded to a square with gray (127, 127, 127) and resized, as the original, to the understanding
        encoder's image size (the model's image size when shared); a decoupled pixel encoder then normalises them
        with its own mean/std. The number of ``<image>`` placeholders is its number of features. Greedy decoding by default; ``do_sample=True`` samples, reproducibly for a given ``seed``.
        ``min_new_tokens`` forbids stopping earlier.
        """
        check_understanding_arguments(  # types, finiteness and the batch limit (harmon.validation), before any work
            image=image, question=question, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, seed=seed, min_new_tokens=min_new_tokens,
            skip_special_tokens=skip_special_tokens,
        )
        batched = isinstance(question, (list, tuple))
        questions = list(question) if batched else [question]
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError("question: give a non-empty question string (or a list of them)")
        if len(images) != len(questions):
            raise ValueError(f"image: got {len(images)} images for {len(questions)} questions")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        model = self.model
        size = model.understanding_image_size
        pixels = preprocess_for_understanding(images, size).to(self._execution_device, model.dtype)
        self._place("harmon", "vae")
        image_embeds = model.image_embeddings(pixels)
        self._place("llm", "harmon")
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        placeholder = IMAGE_TOKEN * image_embeds.shape[1]
        texts = [self._chat(f"{placeholder}\n{q}") for q in questions]
        rows = [self.tokenizer.encode(text, add_special_tokens=True) for text in texts]
        length = max(len(r) for r in rows)
        if length + max_new_tokens > self.llm.config.max_position_embeddings:
            raise ValueError(
                f"question: {length} prompt tokens + max_new_tokens {max_new_tokens} exceed the LLM context of "
                f"{self.llm.config.max_position_embeddings} positions"
            )
        # left padding, so that every row's answer starts right after its prompt
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row):] = torch.tensor(row)
            attention_mask[i, length - len(row):] = 1
        inputs_embeds = model.splice_image_embeddings(input_ids, image_embeds, image_token_id)
        stop_ids = _stop_token_ids(self.tokenizer)
        sampling = dict(do_sample=do_sample)
        if do_sample:
            sampling.update(temperature=temperature, top_p=top_p)
        devices = [self._execution_device] if self._execution_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=do_sample):
            if do_sample and seed is not None:
                torch.manual_seed(seed)
            new_ids = model.answer(
                inputs_embeds, attention_mask.to(self._execution_device), max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids, pad_token_id=pad_id, min_new_tokens=min_new_tokens, **sampling,
            )
        self.maybe_free_model_hooks()
        answers = self.tokenizer.batch_decode(new_ids, skip_special_tokens=skip_special_tokens)
        return answers if batched else answers[0]


# -------------------------------------------------------------------------------------------------- helpers
def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: it has no EOS token (Qwen's <|im_end|> is expected)")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS (``<|im_end|>``) plus ``<|endoftext|>`` when the vocabulary has it: the original's stop words."""
    ids = [tokenizer.eos_token_id]
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(end_of_text, int) and end_of_text != tokenizer.unk_token_id and end_of_text not in ids:
        ids.append(end_of_text)
    return ids


def _meta_core(folder: Path) -> HarmonCore:
    """The saved HarmonCore's modules on the meta device, from its config alone (for the strict weight check)."""
    config_path = folder / "config.json"
    harmon_config = read_json_file(config_path, "HarmonCore config").get("harmon_config")
    try:
        with torch.device("meta"), saved_weights_follow():
            return HarmonCore(harmon_config=harmon_config)
    except (ValueError, TypeError, KeyError) as error:
        raise IncompleteFolderError(f"{config_path}: its harmon_config is not a valid HarmonConfig ({error})") from None


def _fail_for_unreachable_hub_id(name: str) -> None:
    fail_fast_for_hub_id(
        name, "pipeline",
        "To use the original release offline, convert local files: `harmon convert --harmon harmon_1.5b.pth "
        "--vae kl16.ckpt --llm <Qwen2.5 folder> --preset harmon-1.5b --out <folder>` and pass that folder.",
    )


__all__ = ["HarmonPipeline"]
