"""``harmon demo``: a gradio web app over :class:`~harmon.pipelines.HarmonPipeline` with two tabs.

**Generate** calls ``pipe(prompt, ...)`` (every ``__call__`` argument has a control; the progress bar is fed by
``callback_on_step_end``; the gallery downloads PNGs) and **Describe** calls ``pipe.understand(image, question,
...)``. It is a thin layer: the pipeline checks the arguments, and its ``ValueError``/``TypeError`` text is shown
in the page (``gr.Error``) instead of a traceback. Requests are queued and run one at a time on the one loaded
pipeline; their size is bounded by the pipeline's own limits (image side, LLM context) and the launch options.

Nothing is fetched from the internet: analytics are off, there is no share link unless asked for, and the default
theme's fonts are served by the app itself.

    from harmon.demo import launch
    launch("harmon-toy")                       # or a pipeline folder, or a loaded HarmonPipeline

gradio is an optional extra: ``pip install "harmon[demo]"``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from harmon.model import GUIDANCE_SCHEDULES, SAMPLERS
from harmon.pipelines.pipeline_harmon import MAX_IMAGE_SIDE
from harmon.validation import MAX_IMAGES_PER_CALL

if TYPE_CHECKING:
    import gradio as gr

    from harmon.pipelines import HarmonPipeline

DEFAULT_PIPELINE = "harmon-toy"
DEFAULT_QUESTION = "Describe this image in detail."
SEED_RANGE = 2**31
# the one pipeline is not safe to call from two threads at once: both tabs share this concurrency group (limit 1)
PIPELINE_CONCURRENCY_ID = "harmon-pipeline"


def _gradio():
    # gradio reads this variable at each telemetry call (not only in ``Blocks(analytics_enabled=...)``), so it is
    # set for the process before gradio is imported: the demo never phones home
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as error:
        raise ImportError('harmon demo needs gradio: pip install "harmon[demo]"') from error
    return gradio


@contextmanager
def _errors_in_page() -> Iterator[None]:
    """The pipeline's own argument errors become a readable message in the page (no traceback)."""
    gr = _gradio()
    try:
        yield
    except (ValueError, TypeError) as error:
        raise gr.Error(str(error), print_exception=False) from None


def _optional_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def build_demo(pipe: HarmonPipeline, *, max_images: int = 4, max_queue: int = 16,
               title: str = "Harmon") -> gr.Blocks:
    """The two-tab app over ``pipe`` (not launched). ``max_images`` bounds the images of one Generate request,
    ``max_queue`` the requests waiting in the queue (more are refused with a message)."""
    if not isinstance(max_images, int) or not 1 <= max_images <= MAX_IMAGES_PER_CALL:
        raise ValueError(f"max_images must be an int in [1, {MAX_IMAGES_PER_CALL}] (the pipeline's limit per call), "
                         f"got {max_images!r}")
    if not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
    gr = _gradio()
    config = pipe.model.config
    stride = config.latent_stride
    default_steps = min(64, (config.image_size // stride) ** 2)
    context = pipe.llm.config.max_position_embeddings

    def generate(prompt, negative_prompt, width, height, steps, guidance_scale, guidance_schedule, temperature,
                 sampler, head_steps, seed, random_seed, num_images, condition_image=None, progress=gr.Progress()):
        seed = random.randrange(SEED_RANGE) if random_seed or seed is None else int(seed)
        num_images = int(num_images)
        generators = [torch.Generator().manual_seed(seed + k) for k in range(num_images)]

        def on_step_end(pipeline, step, num_steps, callback_kwargs):
            progress((step + 1, num_steps), desc="MAR steps")
            return callback_kwargs

        progress(0, desc="MAR steps")
        # with an image: generate from its understanding embeddings, the prompt (if any) an instruction after them
        conditioned = {"image": condition_image, "prompt": (prompt or "").strip() or None} if condition_image else {}
        with _errors_in_page():
            images = pipe(
                **(conditioned or {"prompt": prompt}), negative_prompt=negative_prompt or None, width=_optional_int(width),
                height=_optional_int(height), num_inference_steps=_optional_int(steps),
                guidance_scale=float(guidance_scale), guidance_schedule=guidance_schedule,
                temperature=float(temperature), num_images_per_prompt=num_images, generator=generators,
                sampler=sampler, head_steps=int(head_steps) if head_steps else None, callback_on_step_end=on_step_end,
            ).images
        return [(image, f"seed {seed + k}") for k, image in enumerate(images)], seed

    def describe(image, question, max_new_tokens, decoding, temperature, seed):
        with _errors_in_page():
            return pipe.understand(
                image, question, max_new_tokens=int(max_new_tokens), do_sample=decoding == "sampled",
                temperature=float(temperature), seed=_optional_int(seed),
            )

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nOne model, two directions: text → image and image → text.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                        placeholder="a red fox in the snow")
                    negative_prompt = gr.Textbox(label="Negative prompt", elem_id="negative-prompt",
                                                 placeholder='empty: "Generate an image."')
                    with gr.Row():
                        width = gr.Number(config.image_size, label="Width", precision=0, step=stride,
                                          elem_id="width", info=f"multiple of {stride}, at most {MAX_IMAGE_SIDE}")
                        height = gr.Number(config.image_size, label="Height", precision=0, step=stride,
                                           elem_id="height", info=f"multiple of {stride}, at most {MAX_IMAGE_SIDE}")
                        steps = gr.Number(default_steps, label="MAR steps", precision=0, elem_id="steps",
                                          info="at most the image's tokens")
                    with gr.Row():
                        guidance_scale = gr.Slider(1.0, 10.0, value=3.0, step=0.1, label="Guidance scale",
                                                   elem_id="guidance-scale", info="1 turns guidance off")
                        guidance_schedule = gr.Radio(list(GUIDANCE_SCHEDULES), value="constant",
                                                     label="Guidance schedule", elem_id="guidance-schedule")
                        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature",
                                                elem_id="temperature")
                    with gr.Row():
                        sampler = gr.Radio(list(SAMPLERS), value="exact", label="Sampler", elem_id="sampler")
                        head_steps = gr.Number(0, label="Head steps", precision=0, elem_id="head-steps",
                                               info='"fast" sampler only; 0: its default')
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                        random_seed = gr.Checkbox(False, label="Random seed", elem_id="random-seed")
                        num_images = gr.Slider(1, max_images, value=1, step=1, label="Images",
                                               elem_id="num-images")
                    condition_image = gr.Image(label="Generate from an image (optional; the prompt becomes an "
                                               "instruction)", type="pil", sources=["upload", "clipboard"],
                                               elem_id="condition-image")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="Images", format="png", columns=2, object_fit="contain", elem_id="gallery",
                                         buttons=["download", "fullscreen"], interactive=False)
                    used_seed = gr.Number(label="Seed used (image k used seed + k)", precision=0,
                                          interactive=False, elem_id="used-seed")
        with gr.Tab("Describe"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="pil", sources=["upload", "webcam", "clipboard"],
                                     elem_id="image")
                    question = gr.Textbox(DEFAULT_QUESTION, label="Question", lines=2, elem_id="question")
                    max_new_tokens = gr.Slider(1, context, value=min(256, context), step=1, label="Max new tokens",
                                               elem_id="max-new-tokens", info=f"the LLM context is {context}")
                    with gr.Row():
                        decoding = gr.Radio(["greedy", "sampled"], value="greedy", label="Decoding",
                                            elem_id="decoding")
                        answer_temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature",
                                                       info="sampled only", elem_id="answer-temperature")
                        answer_seed = gr.Number(0, label="Seed", precision=0, elem_id="answer-seed",
                                                info="sampled only")
                    describe_button = gr.Button("Describe", variant="primary", elem_id="describe")
                with gr.Column():
                    answer = gr.Textbox(label="Answer", lines=8, interactive=False, elem_id="answer")

        shared = dict(concurrency_limit=1, concurrency_id=PIPELINE_CONCURRENCY_ID)
        generate_button.click(
            generate,
            [prompt, negative_prompt, width, height, steps, guidance_scale, guidance_schedule, temperature, sampler,
             head_steps, seed, random_seed, num_images, condition_image],
            [gallery, used_seed], api_name="generate", **shared,
        )
        describe_button.click(
            describe, [image, question, max_new_tokens, decoding, answer_temperature, answer_seed], answer,
            api_name="describe", **shared,
        )
    return demo.queue(max_size=max_queue, default_concurrency_limit=1)


def load_pipeline(pipeline: str | os.PathLike = DEFAULT_PIPELINE, *, device: str | None = None,
                  dtype: torch.dtype | None = None, cpu_offload: bool = False) -> HarmonPipeline:
    """Load ``pipeline`` (a folder or ``harmon-toy``) once, on ``device`` (default: cuda when available), or with
    per-phase CPU offload to it."""
    from harmon.pipelines import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(pipeline, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def launch(pipeline: str | os.PathLike | HarmonPipeline = DEFAULT_PIPELINE, *, host: str = "127.0.0.1",
           port: int | None = 7860, share: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
           cpu_offload: bool = False, max_images: int = 4, max_queue: int = 16, max_file_size: str = "25mb",
           block: bool = True, **launch_kwargs: Any) -> gr.Blocks:
    """Load the pipeline once (unless one is given), build the app and serve it on ``host:port``.

    ``share=True`` asks gradio for a public link (off by default). ``block=False`` returns at once with the server
    running in a thread (``demo.close()`` stops it). Other keyword arguments go to ``gr.Blocks.launch``.
    """
    from harmon.pipelines import HarmonPipeline

    _gradio()  # a missing gradio fails before the model is loaded
    pipe = pipeline if isinstance(pipeline, HarmonPipeline) else load_pipeline(
        pipeline, device=device, dtype=dtype, cpu_offload=cpu_offload)
    demo = build_demo(pipe, max_images=max_images, max_queue=max_queue)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                prevent_thread_lock=not block, **launch_kwargs)
    return demo


__all__ = ["build_demo", "launch", "load_pipeline"]
