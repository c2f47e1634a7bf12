"""``HarmonPipeline``: text → image and image → text with one Harmon model, as a diffusers pipeline.

The pipeline owns the masked-autoregressive sampling loop (``__call__``): validate → encode the prompt (the
:class:`~harmon.pipelines.HarmonProcessor`) → prefill the LLM's KV cache → per step: encoder → LLM → decoder (the
:class:`~harmon.core.HarmonCore` entry points) → the diffusion head samples on the
:class:`~harmon.schedulers.ADMScheduler` → the unconditional rows take the conditional rows' tokens →
``callback_on_step_end`` → progress; then the VAE decodes.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from transformers import PreTrainedModel

from harmon.checkpoints import IncompleteFolderError, check_pipeline_folder, read_json_file
from harmon.core import HarmonCore, prefill, splice_image_embeddings, through_llm
from harmon.encoders.common import fail_fast_for_hub_id
from harmon.heads.diffusion import adm_scheduler_for
from harmon.image_conditioning import image_generation_rows, image_prompt_embeddings, prefill_embeddings
from harmon.latents import latents_to_tokens, tokens_to_latents, vae_encode
from harmon.model import GUIDANCE_SCHEDULES, SAMPLERS, HarmonModel, mask_schedule
from harmon.pipelines.image_processing import ImageInput, postprocessor
from harmon.pipelines.processing_harmon import HarmonProcessor
from harmon.randomness import as_random_source
from harmon.schedulers import ADMScheduler
from harmon.validation import check_generation_arguments, check_understanding_arguments

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_IMAGE_SIDE = 4096
DEFAULT_MAR_STEPS = 64
# the module a saved folder carries so that diffusers' generic loader resolves the class (see save_pretrained)
PIPELINE_MODULE = "harmon_pipeline"
PIPELINE_MODULE_SOURCE = "from harmon.pipelines.pipeline_harmon import HarmonPipeline  # noqa: F401\n"

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
        processor ([`HarmonProcessor`]): tokenizer, chat template, ``<image>`` placeholder, stop ids, image
            preparation for understanding.
        llm ([`~transformers.PreTrainedModel`]): the causal LLM (``Qwen2ForCausalLM``).
        harmon ([`~harmon.core.HarmonCore`]): MAR encoder, MAR decoder, diffusion head and connectors (and,
            decoupled, the understanding encoder with its own connector).
        vae ([`~diffusers.AutoencoderKL`]): the KL-16 image tokenizer; its ``scaling_factor`` is Harmon's
            ``vae_scale`` (0.2325).
        scheduler ([`~harmon.schedulers.ADMScheduler`]): the diffusion head's chain (ADM cosine, learned range,
            respaced to ``num_sampling_steps``). Another ADMScheduler config is used as given; a scheduler the
            head cannot sample with is refused.
    """

    model_cpu_offload_seq = "llm->harmon->vae"
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["tokens", "mask"]

    def __init__(
        self,
        processor: HarmonProcessor,
        llm: PreTrainedModel,
        harmon: HarmonCore,
        vae: AutoencoderKL,
        scheduler: ADMScheduler,
    ) -> None:
        super().__init__()
        harmon.head.check_scheduler(scheduler)  # refuse what the head cannot use, before registering anything
        if getattr(vae.config, "scaling_factor", None) != harmon.harmon.vae_scale:
            # diffusers' latent convention: latents = posterior × scaling_factor (Harmon's vae_scale)
            vae.register_to_config(scaling_factor=harmon.harmon.vae_scale)
        self.register_modules(processor=processor, llm=llm, harmon=harmon, vae=vae, scheduler=scheduler)
        self.image_processor = postprocessor()

    # ------------------------------------------------------------------------------------------ construction
    @property
    def tokenizer(self):
        """The processor's tokenizer."""
        return self.processor.tokenizer

    @property
    def model(self) -> HarmonModel:
        """A :class:`HarmonModel` over the pipeline's components (same module objects, nothing copied): the
        training-side view (losses, ``config``)."""
        cached = self.__dict__.get("_model_view")
        parts = (self.harmon, self.llm, self.vae)
        if cached is None or cached[0] != tuple(map(id, parts)):
            cached = (tuple(map(id, parts)), HarmonModel.from_core(self.harmon, self.llm, self.vae))
            self.__dict__["_model_view"] = cached
        return cached[1]

    @classmethod
    def from_model(
        cls, model: HarmonModel, tokenizer, scheduler: ADMScheduler | None = None
    ) -> "HarmonPipeline":
        """A pipeline sharing ``model``'s modules (no copy); ``tokenizer`` (or a ready :class:`HarmonProcessor`)."""
        processor = tokenizer if isinstance(tokenizer, HarmonProcessor) else HarmonProcessor.from_config(
            tokenizer, model.config, image_size=model.core.understanding_image_size
        )
        return cls(
            processor=processor, llm=model.llm, harmon=model.core, vae=model.vae,
            scheduler=scheduler if scheduler is not None else adm_scheduler_for(model.head.config),
        )

    @classmethod
    def from_original(
        cls,
        harmon_checkpoint: str | os.PathLike,
        vae_checkpoint: str | os.PathLike | None = None,
        llm_folder: str | os.PathLike | None = None,
        *,
        original_config: str | os.PathLike | dict | None = None,
        preset: str | None = None,
        attn_implementation: str = "auto",
    ) -> "HarmonPipeline":
        """Convert the original release (``harmon_*.pth``, ``kl16.ckpt``, a Qwen folder with its tokenizer).

        ``original_config`` (the CLI's ``--config``): the release's ``configs/models/*.py`` (read, not run), or
        its JSON form; ``vae_checkpoint`` / ``llm_folder`` then default to the ones it names. Or a ``preset``."""
        from transformers import AutoTokenizer

        from harmon.conversion import load_original_harmon, resolve_original_files

        original_config, vae_checkpoint, llm_folder = resolve_original_files(  # the files the config names
            vae_checkpoint, llm_folder, original_config)
        model = load_original_harmon(
            harmon_checkpoint, vae_checkpoint, llm_folder, original_config=original_config, preset=preset,
            attn_implementation=attn_implementation,
        )
        return cls.from_model(model, AutoTokenizer.from_pretrained(str(llm_folder)))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "HarmonPipeline":
        """Load a saved pipeline folder (``dtype=``, default float32 for every component whatever the saved dtype;
        ``attn_implementation=`` accepted).

        Only local folders are read here; a hub id fails fast when the hub cannot be reached. Core weights are
        checked strictly: missing, unexpected and mis-shaped keys are named.
        """
        # --- embedded pipelines shipped in the package ("harmon-toy"): harmon.toy resolves the name to its folder
        from harmon.toy import resolve_embedded

        pretrained_model_name_or_path, kwargs = resolve_embedded(pretrained_model_name_or_path, kwargs)
        # ---
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            _fail_for_unreachable_hub_id(str(pretrained_model_name_or_path))
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        # every component strictly, before loading (harmon.checkpoints): transformers would re-initialise a
        # missing LLM tensor; errors name the file and the keys
        check_pipeline_folder(path, cls.__name__, list(inspect.signature(cls.__init__).parameters)[1:],
                              build={"harmon": _meta_core}, variant=kwargs.get("variant"))
        stub = path / f"{PIPELINE_MODULE}.py"
        if stub.is_file():
            if stub.read_text() != PIPELINE_MODULE_SOURCE:
                raise ValueError(f"{stub} is not the file HarmonPipeline.save_pretrained writes; refusing to run it")
        attn_implementation = kwargs.pop("attn_implementation", None)
        if "torch_dtype" in kwargs:  # diffusers' older spelling
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        if kwargs.get("dtype") is None:
            # one dtype for every component: diffusers loads its models in float32 unless told otherwise, but
            # transformers 5 loads the LLM in its saved dtype ("auto"), so an fp16 folder gave a float16 LLM next to
            # a float32 core ("mat1 and mat2 must have the same dtype" at the first step)
            kwargs["dtype"] = torch.float32
        pipe = super().from_pretrained(str(path), **kwargs)  # building reads no weight file: all come from here
        if attn_implementation is not None:
            pipe.set_attn_implementation(attn_implementation)
        return pipe

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_config``, with the custom-pipeline form of ``_class_name`` that ``save_pretrained``
        writes (``["harmon_pipeline", "HarmonPipeline"]``) read back as the plain class name when the class itself
        loads. diffusers would otherwise import the folder's one-line module through its dynamic-module cache
        (a copy into ``HF_MODULES_CACHE`` then an import) although the class is already known; ranks of a
        multi-process launch doing that copy at once on a fresh machine import a half-written file
        (``module 'diffusers_modules.local.harmon_pipeline' has no attribute 'HarmonPipeline'``).
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` still takes the module route."""
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and list(name) == [PIPELINE_MODULE, cls.__name__]:
            config["_class_name"] = cls.__name__
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (``safe_serialization``, ``variant``, ``max_shard_size`` all apply to
        every component), plus what lets diffusers' generic loader find this class: ``model_index.json`` names it
        in diffusers' custom-pipeline form ``["harmon_pipeline", "HarmonPipeline"]`` and the folder gets that
        one-line module (``from harmon.pipelines.pipeline_harmon import HarmonPipeline``), so
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` returns a :class:`HarmonPipeline`
        (diffusers asks ``trust_remote_code`` for any code file in a folder; ``HarmonPipeline.from_pretrained``
        refuses a folder whose file is not exactly that line, and never imports it: see :meth:`load_config`)."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_MODULE_SOURCE)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------ offloading
    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload (accelerate hooks, ``model_cpu_offload_seq`` = llm → harmon → vae; raises
        without an accelerator unless ``device`` is given), with one per-phase change: the LLM and the Harmon core
        run alternately at every MAR step, so the core's hook does not evict the LLM (which would shuttle it
        between devices twice per step). During sampling both are resident; decoding evicts the core for the VAE;
        the end of every call returns everything to the CPU (``maybe_free_model_hooks``)."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        hook = getattr(self.harmon, "_hf_hook", None)
        if hook is not None and hasattr(hook, "prev_module_hook"):
            hook.prev_module_hook = None

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' sequential offload (every leaf module's weights on the meta device until it runs; raises
        without an accelerator unless ``device`` is given). The fused head sampler reads the weights at call time
        through accelerate's ``align_module_device``, so it works under it too.

        On a CPU ``device`` diffusers sets the hooks' execution device to ``cpu:0``, on which accelerate's hooks fail
        (``set_module_tensor_to_device`` no longer recognises the tensors as already placed); the hooks are pointed
        at plain ``cpu`` instead, which is the same device."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if self._offload_device.type == "cpu":
            from accelerate.hooks import AlignDevicesHook

            cpu = torch.device("cpu")
            self._offload_device = cpu
            for component in self.components.values():
                if isinstance(component, torch.nn.Module):
                    for module in component.modules():
                        hook = getattr(module, "_hf_hook", None)
                        if isinstance(hook, AlignDevicesHook):
                            hook.execution_device = cpu

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """``sdpa`` | ``eager`` | ``flash_attention_2`` | ``auto`` (flash-attn 2 on CUDA when installed)."""
        from harmon.backbones.qwen import resolve_attn_implementation

        self.llm.set_attn_implementation(resolve_attn_implementation(attn_implementation, self.device))

    # ------------------------------------------------------------------------------------------ state
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """The number of MAR steps of the current (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------------------------------ validation
    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
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
        callback_on_step_end_tensor_inputs: Sequence[str] = ("tokens",),
        prompt_input_ids: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
    ) -> list[str] | list[str | None] | None:
        """Validate the arguments of ``__call__``; return the prompts as a list (``None`` for prompt ids; with
        ``image``, one instruction or ``None`` per image)."""
        prompts = None
        if image is not None:
            prompts = self._check_image_inputs(image, prompt, negative_prompt, prompt_input_ids)
            images = len(prompts) * num_images_per_prompt if isinstance(num_images_per_prompt, int) else 0
        elif prompt_input_ids is not None:
            if prompt is not None:
                raise ValueError("prompt: give either prompt or prompt_input_ids, not both")
            if prompt_attention_mask is None or prompt_attention_mask.shape != prompt_input_ids.shape:
                raise ValueError("prompt_attention_mask: give one of the shape of prompt_input_ids")
            rows = prompt_input_ids.shape[0]
            if guidance_scale > 1 and rows % 2:
                raise ValueError(f"prompt_input_ids: guidance needs [cond; uncond] rows, got an odd number of rows ({rows})")
            images = rows // 2 if guidance_scale > 1 else rows
        else:
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
                if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
                    raise TypeError(
                        f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}"
                    )
                if len(negative_prompt) != len(prompts):
                    raise ValueError(
                        f"negative_prompt: got {len(negative_prompt)} negative prompts for {len(prompts)} prompts"
                    )
            images = len(prompts) * num_images_per_prompt if isinstance(num_images_per_prompt, int) else 0
        stride = self.harmon.harmon.latent_stride
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
        if isinstance(generator, (list, tuple)) and len(generator) != images:
            raise ValueError(f"generator: got a list of {len(generator)} generators for {images} images")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        scheduler = self.harmon.head.check_scheduler(self.scheduler)  # a scheduler swapped in since __init__
        if head_steps is not None:
            if sampler != "fast":
                raise ValueError(f"head_steps applies to sampler='fast' only (got sampler={sampler!r})")
            configured = scheduler.config.num_sampling_steps
            if not isinstance(head_steps, int) or isinstance(head_steps, bool) or not 1 <= head_steps < configured:
                raise ValueError(
                    f"head_steps must be an int between 1 and the head's {configured} sampling steps (exclusive), "
                    f"got {head_steps!r}"
                )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {unknown} are not among {self._callback_tensor_inputs}"
            )
        return list(prompts) if prompts is not None else None

    @staticmethod
    def _check_image_inputs(image, prompt, negative_prompt, prompt_input_ids) -> list[str | None]:
        """Image-conditioned generation: one instruction (or ``None``) per image."""
        if prompt_input_ids is not None:
            raise ValueError("image: give either image or prompt_input_ids, not both")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("image: the list of images is empty")
        if prompt is None:
            instructions = [None] * len(images)
        elif isinstance(prompt, str):
            instructions = [prompt] * len(images)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) or p is None for p in prompt):
            if len(prompt) != len(images):
                raise ValueError(f"prompt: got {len(prompt)} instructions for {len(images)} images")
            instructions = list(prompt)
        else:
            raise TypeError(f"prompt must be None, a string or a list of strings, got {type(prompt).__name__}")
        empty = [i for i, p in enumerate(instructions) if p is not None and not p.strip()]
        if empty:
            raise ValueError(f"prompt: instruction(s) {empty} are empty (pass None for no instruction)")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(images):
                raise ValueError("negative_prompt: give one string, or one per image")
        return instructions

    # ------------------------------------------------------------------------------------------ prompts
    def image_embeddings(
        self, image: ImageInput | Sequence[ImageInput], image_size: int | None = None
    ) -> torch.Tensor:
        """The understanding path's LLM-side embeddings ``(B, N, H)`` of images (PIL, arrays, tensors, paths):
        EXIF-oriented, gray-padded to a square and resized to ``image_size`` (default: the processor's; a pixel
        encoder: its own), then VAE → encoder → ``proj_in`` (shared) or the understanding encoder (decoupled)."""
        core = self.harmon
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        pixels = self.processor.preprocess_images(images, self._understanding_size(image_size))
        pixels = pixels.to(self._execution_device, core.dtype)
        if core.understanding_reads_pixels:
            return core.understanding_features(pixels=pixels)
        latents = vae_encode(self.vae, pixels, self.vae.config.scaling_factor)
        return core.understanding_features(tokens=latents_to_tokens(latents, core.harmon.patch_size).to(core.dtype))

    def encode_image_prompt(
        self,
        images: Sequence[ImageInput],
        instructions: list[str | None],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        num_image_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt rows for generation from images (RecA's inference side), as ``(input_ids, attention_mask,
        inputs_embeds)``: each image's understanding embeddings (:meth:`image_embeddings`) where a text prompt
        holds its caption (``"Generate an image: " + <image> [+ "\n" + instruction]``,
        :func:`harmon.image_conditioning.image_generation_rows`), the unconditional rows as for text → image."""
        image_embeds = self.image_embeddings(images)
        input_ids, attention_mask = image_generation_rows(
            self.processor, instructions, image_embeds.shape[1], negative_prompt, num_images_per_prompt,
            do_classifier_free_guidance,
        )
        self._check_context(input_ids.shape[1], num_image_tokens + self.harmon.buffer_size)
        device = self._execution_device
        input_ids = input_ids.to(device)
        inputs_embeds = image_prompt_embeddings(
            self.llm, input_ids, image_embeds.repeat_interleave(num_images_per_prompt, dim=0),
            self.processor.image_token_id, len(instructions) * num_images_per_prompt,
        )
        return input_ids, attention_mask.to(device), inputs_embeds

    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        num_image_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-wrapped prompt rows ``[cond…; uncond…]`` (right-padded with EOS) and their attention mask, on the
        execution device (:meth:`HarmonProcessor.generation_inputs`)."""
        input_ids, attention_mask = self.processor.generation_inputs(
            prompts, negative_prompt, num_images_per_prompt, do_classifier_free_guidance
        )
        self._check_context(input_ids.shape[1], num_image_tokens + self.harmon.buffer_size)
        device = self._execution_device
        return input_ids.to(device), attention_mask.to(device)

    def _check_context(self, prompt_tokens: int, image_tokens: int) -> None:
        limit = self.llm.config.max_position_embeddings
        if prompt_tokens + image_tokens > limit:
            raise ValueError(
                f"prompt: {prompt_tokens} prompt tokens + {image_tokens} image tokens exceed the LLM context of "
                f"{limit} positions; shorten the prompt or the image"
            )

    # ------------------------------------------------------------------------------------------ sampling
    def head_sampler(self, sampler: str = "exact", head_steps: int | None = None, compile_head: bool = False):
        """The diffusion head's per-call sampling function on this pipeline's scheduler (``head.sample``'s
        contract): ``"plain"`` steps the scheduler once per timestep through the denoiser's modules; ``"exact"``
        is the fused loop on the same chain (same draws, same samples to float round-off); ``"fast"`` the fused
        loop on the chain respaced to ``head_steps`` (default: a quarter), coupled to the exact sampler's draws."""
        head = self.harmon.head
        chain = head.check_scheduler(self.scheduler).respaced()  # a copy: a shared scheduler keeps its state
        if sampler == "plain":
            return lambda c, **kwargs: head.sample(c, scheduler=chain, **kwargs)
        prepare = getattr(head, "prepare_sampler", None)
        if prepare is None:
            if sampler == "fast":
                raise ValueError(f"sampler='fast' needs a head with prepare_sampler; {type(head).__name__} has none")
            return lambda c, **kwargs: head.sample(c, scheduler=chain, **kwargs)
        return prepare(head_steps, fast=sampler == "fast", compile=compile_head, scheduler=chain)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["HarmonPipeline", int, int, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("tokens",),
        sampler: str = "exact",
        head_steps: int | None = None,
        prompt_input_ids: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        random_source=None,
        compile_head: bool = False,
        image: ImageInput | Sequence[ImageInput] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text, or from images (``image=``).

        Args:
            prompt: the prompt or prompts (wrapped as the original: ``"Generate an image: " + prompt`` in the
                Qwen chat template; tokenized as text, never as control tokens).
            negative_prompt: the unconditional prompt for classifier-free guidance, one for all or one per prompt
                (default ``"Generate an image."``).
            height, width: output size in pixels, multiples of 16 (default: the model's image size; non-square
                allowed).
            num_inference_steps: masked-autoregressive steps, each predicting at least one token (default
                ``min(64, m·n)``: the release's 64 steps, or one per token for small grids).
            guidance_scale: classifier-free guidance on the diffusion head's ε (1 disables it).
            guidance_schedule: ``"constant"`` or ``"linear"`` (grows from 1 with the share of tokens generated).
            temperature: scales the diffusion head's sampling noise.
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` or one per image; the same seeds give the same images.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (``[0, 1]``) or ``"latent"``: the VAE latents
                ``(B, C, H/16, W/16)`` scaled by ``vae.config.scaling_factor``, as diffusers returns them (decode
                with ``pipe.vae.decode(latents / pipe.vae.config.scaling_factor)``).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: ``callback(pipe, step, num_steps, callback_kwargs)`` after each step;
                ``callback_kwargs`` holds the tensors named in ``callback_on_step_end_tensor_inputs``
                (``"tokens"``: the conditional rows' tokens ``(B, m, n, C)``, 0 where still masked; ``"mask"``:
                ``(B, m·n)``, 1 = still masked). The dict it returns (``None``: nothing changed) replaces them;
                the unconditional rows follow. Setting ``pipe._interrupt = True`` skips the remaining steps.
            sampler: ``"exact"`` (default: the fused sampler, the plain one's samples to float round-off),
                ``"plain"`` (the scheduler stepped through the denoiser's modules, to compare against) or
                ``"fast"`` (fewer denoising steps in the diffusion head; see ``docs/performance.md``).
            head_steps: the diffusion head's denoising steps for ``sampler="fast"`` (default: a quarter).
            prompt_input_ids, prompt_attention_mask: ready prompt rows ``(R, T)`` instead of ``prompt``
                (right-padded, ``[cond; uncond]`` with guidance).
            random_source: a :mod:`harmon.randomness` source for every draw instead of ``generator`` (e.g. a
                ``ReplayRandomSource`` replaying a recorded run).
            compile_head: ``torch.compile`` the fused head step (CUDA graphs on CUDA).
            image: generate from images instead (reconstruction / variation, the inference side of RecA): each
                image's understanding embeddings stand where a text prompt holds its caption; ``prompt`` is then
                ``None``, one instruction for all, or one (or ``None``) per image, put after the embeddings.
                ``num_images_per_prompt`` counts per image; everything else is as for text.
        """
        check_generation_arguments(  # types, finiteness and the batch limit (harmon.validation), before any work
            prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale, temperature=temperature,
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
            generator=generator, callback_on_step_end=callback_on_step_end, prompt_input_ids=prompt_input_ids,
            num_conditioning_images=None if image is None else len(image) if isinstance(image, (list, tuple)) else 1,
        )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs  # diffusers' callback objects
        core = self.harmon
        config = core.harmon
        height = height if height is not None else config.image_size
        width = width if width is not None else config.image_size
        if num_inference_steps is None and all(isinstance(v, int) for v in (height, width)):
            num_inference_steps = min(DEFAULT_MAR_STEPS, (height // config.latent_stride) * (width // config.latent_stride))
        prompts = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_schedule,
            temperature, num_images_per_prompt, generator, output_type, sampler, head_steps,
            callback_on_step_end_tensor_inputs, prompt_input_ids, prompt_attention_mask, image,
        )
        self._guidance_scale = float(guidance_scale)
        self._num_timesteps = num_inference_steps
        self._interrupt = False
        guided = self.do_classifier_free_guidance
        device = self._execution_device
        m, n = core.latent_grid(height, width)
        seq_len = m * n

        # 1. prompt rows (from images: also their embeddings)
        prompt_embeds = None
        if image is not None:
            input_ids, attention_mask, prompt_embeds = self.encode_image_prompt(
                list(image) if isinstance(image, (list, tuple)) else [image], prompts, negative_prompt,
                num_images_per_prompt, guided, num_image_tokens=seq_len,
            )
        elif prompts is not None:
            input_ids, attention_mask = self.encode_prompt(
                prompts, negative_prompt, num_images_per_prompt, guided, num_image_tokens=seq_len
            )
        else:
            self._check_context(prompt_input_ids.shape[1], seq_len + core.buffer_size)
            input_ids, attention_mask = prompt_input_ids.to(device), prompt_attention_mask.to(device)
        rows = input_ids.shape[0]
        images = rows // 2 if guided else rows

        # 2. prefill, state, randomness
        source = as_random_source(generator, random_source)
        sample_tokens = self.head_sampler(sampler, head_steps, compile_head)
        cache = prefill(self.llm, input_ids) if prompt_embeds is None else prefill_embeddings(self.llm, prompt_embeds)
        prompt_length = cache.get_seq_length()
        dtype = core.dtype
        tokens = torch.zeros(rows, seq_len, config.token_dim, device=device, dtype=dtype)
        mask = torch.ones(rows, seq_len, device=device, dtype=dtype)
        orders = source.orders(images, seq_len, device)
        if guided:
            orders = torch.cat([orders, orders])
        lengths = mask_schedule(seq_len, num_inference_steps)
        # exact/fast: one encoder pass per guidance pair (both halves hold the same tokens, mask and buffer and the
        # encoder does not read the prompt), the decoder at the predicted positions only; plain: everything
        share_encoder = guided and sampler != "plain"
        decoder_at_positions = sampler != "plain"

        # 3. the MAR loop
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for step in range(num_inference_steps):
                if self.interrupt:
                    continue
                if step == num_inference_steps - 1:
                    to_predict, next_mask = mask.bool(), mask
                else:
                    next_mask = torch.zeros_like(mask).scatter_(1, orders[:, : lengths[step]], 1.0)
                    to_predict = mask.bool() & ~next_mask.bool()
                if share_encoder:
                    x_half, z_half = core.visual_features(tokens[:images].view(images, m, n, -1), mask[:images])
                    x_enc = through_llm(core, self.llm, torch.cat([x_half, x_half]), torch.cat([z_half, z_half]),
                                        attention_mask, past_key_values=cache)
                else:
                    x_enc, z_enc = core.visual_features(tokens.view(rows, m, n, -1), mask)
                    x_enc = through_llm(core, self.llm, x_enc, z_enc, attention_mask, past_key_values=cache)
                cache.crop(prompt_length - cache.get_seq_length())
                if decoder_at_positions:  # the conditions of the tokens predicted now, and only those
                    conditions = core.token_conditions(x_enc, mask, (m, n), positions=to_predict)
                else:
                    conditions = core.token_conditions(x_enc, mask, (m, n))[to_predict]
                mask = next_mask
                if to_predict.any():
                    tokens[to_predict] = sample_tokens(
                        conditions, temperature=temperature, random_source=source, row_groups=rows,
                        guidance_scale=self._step_guidance(lengths[step], seq_len, guidance_schedule),
                    ).to(dtype)
                if guided:
                    # as the original (``cur_tokens[bsz//2:] = cur_tokens[:bsz//2]``): the unconditional rows take
                    # the conditional rows' tokens, so both halves feed the encoder the same tokens next step
                    tokens[images:] = tokens[:images]
                if callback_on_step_end is not None:
                    state = {"tokens": tokens[:images].view(images, m, n, -1), "mask": mask[:images]}
                    outputs = callback_on_step_end(
                        self, step, num_inference_steps, {k: state[k] for k in callback_on_step_end_tensor_inputs}
                    ) or {}
                    if "tokens" in outputs:
                        tokens[:images] = outputs["tokens"].reshape(images, seq_len, -1).to(tokens)
                        if guided:
                            tokens[images:] = tokens[:images]
                    if "mask" in outputs:
                        mask = outputs["mask"].to(mask).repeat(rows // images, 1)
                progress_bar.update()

        # 4. decode
        latents = tokens_to_latents(tokens[:images].view(images, m, n, -1), config.patch_size)
        if output_type == "latent":
            images_out = latents
        else:
            pixels = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images_out = self.image_processor.postprocess(pixels.float().clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out,)
        return ImagePipelineOutput(images=images_out)

    def _step_guidance(self, remaining: int, seq_len: int, schedule: str) -> float:
        """The guidance scale of one MAR step: constant, or linear in the share of tokens generated. Computed in
        float32 as the original computes it from its mask_len tensor, then handed to the head as a Python number
        so that it follows the head's dtype (a float32 tensor broke bfloat16 sampling)."""
        if not self.do_classifier_free_guidance:
            return 1.0
        if schedule == "linear":
            left = torch.tensor([float(remaining)])
            return float(1 + (self._guidance_scale - 1) * (seq_len - left) / seq_len)
        return self._guidance_scale

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
        image_size: int | None = None,
    ) -> str | list[str]:
        """Answer ``question`` about ``image`` (one of each, or equal-length lists for a batch → a list).

        Images are EXIF-oriented, padded to a square with gray (127, 127, 127) and resized, as the original, to
        ``image_size`` (default: the processor's, i.e. what the release's scripts use for the preset; a
        decoupled pixel encoder: its own size). On the token path the ``<image>`` placeholders number
        (image_size/16)² + buffer and the encoder interpolates its position embeddings; a pixel encoder makes its
        fixed number of features. Greedy decoding by default; ``do_sample=True`` samples, reproducibly for a given
        ``seed``. ``min_new_tokens`` forbids stopping earlier.
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
        device = self._execution_device
        image_embeds = self.image_embeddings(images, image_size)
        input_ids, attention_mask = self.processor.understanding_inputs(questions, image_embeds.shape[1])
        length = input_ids.shape[1]
        if length + max_new_tokens > self.llm.config.max_position_embeddings:
            raise ValueError(
                f"question: {length} prompt tokens + max_new_tokens {max_new_tokens} exceed the LLM context of "
                f"{self.llm.config.max_position_embeddings} positions"
            )
        inputs_embeds = splice_image_embeddings(self.llm, input_ids.to(device), image_embeds,
                                                self.processor.image_token_id)
        generation_config = self.processor.generation_config
        generation_config.update(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, use_cache=True
        )
        if do_sample:
            generation_config.update(temperature=temperature, top_p=top_p)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=do_sample):
            if do_sample and seed is not None:
                torch.manual_seed(seed)
            new_ids = self.llm.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(device),
                generation_config=generation_config,
            )
        self.maybe_free_model_hooks()
        answers = self.processor.batch_decode(new_ids, skip_special_tokens=skip_special_tokens)
        return answers if batched else answers[0]

    def _understanding_size(self, image_size: int | None) -> int:
        core = self.harmon
        if core.understanding_reads_pixels:
            own = core.understanding_image_size
            if image_size is not None and image_size != own:
                raise ValueError(f"image_size: the understanding encoder reads {own}-pixel images, got {image_size}")
            return own
        if image_size is None:
            return self.processor.image_size
        stride = core.harmon.latent_stride
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size % stride or not \
                stride <= image_size <= MAX_IMAGE_SIDE:
            raise ValueError(f"image_size must be a multiple of {stride} in [{stride}, {MAX_IMAGE_SIDE}], got {image_size!r}")
        return image_size


# -------------------------------------------------------------------------------------------------- helpers
def _meta_core(folder: Path) -> HarmonCore:
    """The saved HarmonCore's modules on the meta device, from its config alone (for the strict weight check)."""
    config_path = folder / "config.json"
    harmon_config = read_json_file(config_path, "HarmonCore config").get("harmon_config")
    try:
        with torch.device("meta"):
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
