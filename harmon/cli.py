"""``harmon`` command line: ``generate``, ``describe``, ``convert``, ``info``, ``demo``, ``bench``.

Thin wrappers over :class:`~harmon.pipelines.HarmonPipeline`. ``generate`` splits its prompts across processes
when started with ``accelerate launch -m harmon.cli generate …``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from harmon.threads import add_threads_argument, apply_threads, positive_int
from harmon.toy import EMBEDDED

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


# every argument is checked before any work (harmon.validation's checks, named as on the command line)
POSITIVE_INTS = ("batch_size", "num_images", "grid_columns", "steps", "height", "width", "head_steps",
                 "max_new_tokens", "max_images", "max_queue")
EXISTING_FILES = ("image", "prompts_file", "harmon", "vae", "config")
EXISTING_FOLDERS = ("pipeline", "llm")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The text → image sampling flags every generating verb takes (``harmon generate`` and the benchmark writers
    of ``harmon.evaluation.cli``): size, MAR steps, guidance, temperature, sampler."""
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--guidance-schedule", choices=("constant", "linear"), default="constant")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sampler", choices=("exact", "plain", "fast"), default="exact",
                        help="exact (default), plain (reference loop) or fast (fewer head denoising steps)")
    parser.add_argument("--head-steps", type=int, help="head denoising steps with --sampler fast")

def validate_arguments(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first bad argument (``--batch-size``, a missing ``--image`` file, …)."""
    from harmon.validation import check_batch, check_int, check_number, check_seed

    def flag(name: str) -> str:
        return name if name in ("pipeline",) else "--" + name.replace("_", "-")

    if args.command == "convert" and args.preset is not None and (args.vae is None or args.llm is None):
        raise SystemExit("harmon convert: --preset needs --vae and --llm (only --config can name them)")
    for name in POSITIVE_INTS:
        if getattr(args, name, None) is not None:
            check_int(flag(name), getattr(args, name), minimum=1)
    if getattr(args, "num_images", None) is not None and getattr(args, "batch_size", None) is not None:
        # images per pipeline call, before loading anything (`harmon toy train --num-images` is a dataset size)
        check_batch("--num-images × --batch-size", args.num_images * args.batch_size)
    if getattr(args, "seed", None) is not None:
        check_seed("--seed", args.seed)
    if getattr(args, "guidance_scale", None) is not None:
        check_number("--guidance-scale", args.guidance_scale, minimum=1)
    if getattr(args, "temperature", None) is not None:
        check_number("--temperature", args.temperature, minimum=0, exclusive_minimum=True)
    for name in EXISTING_FILES:
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:  # repeatable flags (generate --image) give lists
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag(name)}: no such file: {path}")
    if getattr(args, "port", None) is not None:
        check_int("--port", args.port, minimum=0, maximum=65535)
    for name in EXISTING_FOLDERS:
        value = getattr(args, name, None)
        if name == "pipeline" and args.command == "demo":  # the demo also takes a name (its default, harmon-toy)
            continue
        if name == "pipeline" and value in EMBEDDED:  # a pipeline shipped in the package (harmon.toy), by name
            continue
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{flag(name)}: no such folder: {value}")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")


class UsageExit(SystemExit):
    """Exit status 2 (a usage error) that still reads as its message (``str(error)``), already printed."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``harmon generate: error: …``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


PYTHON_TO_CLI = {
    "generate": {
        "num_inference_steps": "--steps", "num_steps": "--steps", "guidance_scale": "--guidance-scale",
        "guidance_schedule": "--guidance-schedule", "num_images_per_prompt": "--num-images",
        "head_steps": "--head-steps", "sampler": "--sampler", "temperature": "--temperature",
        "height": "--height", "width": "--width", "prompt": "--prompt",
    },
    "describe": {
        "max_new_tokens": "--max-new-tokens", "question": "--question", "image": "--image",
        "image_size": "--image-size", "temperature": "--temperature",
    },
}
"""The Python arguments that the CLI's flags feed: an error raised by the pipeline names the flag instead."""


def name_cli_flags(message: str, command: str) -> str:
    """``"num_inference_steps must be ..."`` → ``"--steps must be ..."`` (``sampler='fast'`` → ``--sampler fast``)."""
    for name, flag in PYTHON_TO_CLI.get(command, {}).items():
        message = re.sub(rf"(?<![\w.-]){name}(?:=(['\"]?)([\w-]+)\1|\b)",
                         lambda m, flag=flag: f"{flag} {m.group(2)}" if m.group(2) else flag, message)
    return message


def _torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    return getattr(torch, DTYPES[name])


def _load_pipeline(args):
    import torch

    from harmon.pipelines import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(args.pipeline, dtype=_torch_dtype(args.dtype))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from ``--prompt`` and/or a JSON file: a list of strings or of ``{"prompt": ...}`` objects (the
    original batch script's format), or a text file with one prompt per line."""
    collected = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"--prompts-file: no such file: {path}")
        text = path.read_text()
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise SystemExit(f"--prompts-file: {path} is not valid JSON ({error})") from None
            if not isinstance(data, list):
                raise SystemExit(f"--prompts-file: {path} must hold a JSON list")
            for i, item in enumerate(data):
                if isinstance(item, str):
                    collected.append(item)
                elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                    collected.append(item["prompt"])
                else:
                    raise SystemExit(f"--prompts-file: item {i} of {path} is neither a string nor {{\"prompt\": ...}}")
        else:
            collected += [line.strip() for line in text.splitlines() if line.strip()]
    if not collected:
        raise SystemExit("give at least one --prompt or a --prompts-file")
    return collected


def make_grid(images, columns: int):
    import PIL.Image

    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def cmd_generate(args) -> int:
    import torch
    from harmon.evaluation.common import launch_state

    from harmon.validation import check_texts

    if args.image:
        return _generate_from_images(args)
    prompts = check_texts("--prompt", read_prompts(args.prompt, args.prompts_file))  # before loading anything
    state = launch_state()  # honours ACCELERATE_USE_CPU (the CPU form of accelerate launch --multi_gpu)
    pipe = _load_pipeline(argparse.Namespace(**{**vars(args), "device": args.device or str(state.device)}))
    pipe.set_progress_bar_config(disable=not state.is_local_main_process)
    out = Path(args.out)
    indexed = list(enumerate(prompts))
    with state.split_between_processes(indexed) as mine:
        for start in range(0, len(mine), args.batch_size):
            chunk = mine[start:start + args.batch_size]
            generators = [
                torch.Generator().manual_seed(args.seed + index * args.num_images + k)
                for index, _ in chunk for k in range(args.num_images)
            ]
            images = pipe(
                [p for _, p in chunk],
                height=args.height, width=args.width, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                temperature=args.temperature, num_images_per_prompt=args.num_images, generator=generators,
                sampler=args.sampler, head_steps=args.head_steps,
            ).images
            out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            for j, (index, prompt) in enumerate(chunk):
                mine_images = images[j * args.num_images:(j + 1) * args.num_images]
                for k, image in enumerate(mine_images):
                    image.save(out / f"{index:05d}_{k}.png")
                if args.grid and args.num_images > 1:
                    make_grid(mine_images, args.grid_columns or args.num_images).save(out / f"{index:05d}_grid.png")
                print(f"{index:05d}: {prompt}")
    return 0


def _generate_from_images(args) -> int:
    """``generate --image``: one output set per image, conditioned on its understanding embeddings (RecA's
    inference side); ``--prompt`` is an instruction after them (one for all images, or one per image)."""
    import torch
    from harmon.evaluation.common import launch_state

    images = [Path(path) for path in args.image]
    for path in images:
        if not path.is_file():
            raise SystemExit(f"--image: no such file: {path}")
    instructions = read_prompts(args.prompt, args.prompts_file) if args.prompt or args.prompts_file else None
    if instructions is not None and len(instructions) not in (1, len(images)):
        raise SystemExit(f"--prompt: give one instruction for all images or one per image ({len(images)}), "
                         f"got {len(instructions)}")
    if instructions is not None and len(instructions) == 1:
        instructions = instructions * len(images)
    state = launch_state()  # honours ACCELERATE_USE_CPU (the CPU form of accelerate launch --multi_gpu)
    pipe = _load_pipeline(argparse.Namespace(**{**vars(args), "device": args.device or str(state.device)}))
    pipe.set_progress_bar_config(disable=not state.is_local_main_process)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with state.split_between_processes(list(enumerate(images))) as mine:
        for index, path in mine:
            generators = [torch.Generator().manual_seed(args.seed + index * args.num_images + k)
                          for k in range(args.num_images)]
            outputs = pipe(
                image=str(path), prompt=instructions[index] if instructions else None,
                height=args.height, width=args.width, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                temperature=args.temperature, num_images_per_prompt=args.num_images, generator=generators,
                sampler=args.sampler, head_steps=args.head_steps,
            ).images
            for k, image in enumerate(outputs):
                image.save(out / f"{index:05d}_{k}.png")
            if args.grid and args.num_images > 1:
                make_grid(outputs, args.grid_columns or args.num_images).save(out / f"{index:05d}_grid.png")
            print(f"{index:05d}: {path}" + (f" + {instructions[index]!r}" if instructions else ""))
    return 0


def cmd_describe(args) -> int:
    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    answer = pipe.understand(args.image, args.question, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, seed=args.seed)
    print(answer)
    return 0


def cmd_convert(args) -> int:
    from harmon.configs import to_original_config
    from harmon.pipelines import HarmonPipeline

    pipe = HarmonPipeline.from_original(
        args.harmon, args.vae, args.llm, original_config=args.config, preset=args.preset,
    )
    if args.dtype:
        pipe = pipe.to(dtype=_torch_dtype(args.dtype))
    out = Path(args.out)
    pipe.save_pretrained(str(out))
    (out / "original_config.json").write_text(json.dumps(to_original_config(pipe.model.config), indent=1))
    print(f"wrote {out}")
    return 0


def describe_pipeline(pipe) -> dict:
    """Components, classes, parameter counts and dtypes of a pipeline (what ``harmon info`` prints)."""
    config = pipe.model.config
    components = {}
    for name, component in pipe.components.items():
        entry = {"class": type(component).__name__}
        if hasattr(component, "parameters"):
            parameters = list(component.parameters())
            entry["parameters"] = sum(p.numel() for p in parameters)
            entry["dtype"] = str(parameters[0].dtype).replace("torch.", "") if parameters else None
        components[name] = entry
    core = pipe.harmon
    for part in ("encoder", "decoder", "head", "proj_in", "proj_out", "understanding_encoder", "understanding_proj_in"):
        module = getattr(core, part, None)
        if module is not None:  # a shared core has no understanding encoder of its own
            components[f"harmon.{part}"] = {"parameters": sum(p.numel() for p in module.parameters())}
    understanding = config.understanding_encoder
    return {
        "encoder": config.encoder.name,
        "understanding_encoder": (
            "shared (the generation encoder)" if understanding is None
            else f"{understanding.name} (decoupled, {pipe.model.understanding_image_size} px)"
        ),
        "decoder": config.decoder.name,
        "head": config.head.name,
        "backbone": config.backbone.name,
        "image_size": config.image_size,
        "components": components,
    }


def cmd_info(args) -> int:
    from harmon.pipelines import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(args.pipeline)
    info = describe_pipeline(pipe)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key in ("encoder", "understanding_encoder", "decoder", "head", "backbone", "image_size"):
        print(f"{key:22s} {info[key]}")
    for name, entry in info["components"].items():
        params = f"{entry['parameters']:,}" if "parameters" in entry else "-"
        print(f"  {name:20s} {entry.get('class', ''):24s} {params:>15s} {entry.get('dtype') or ''}")
    return 0


def cmd_bench(args) -> int:
    from harmon.evaluation.cli import main as bench_main  # its own parser: harmon.evaluation.cli

    return bench_main(args.bench_args)


def cmd_demo(args) -> int:
    from harmon import demo

    try:
        demo.launch(args.pipeline, host=args.host, port=args.port, share=args.share, device=args.device,
                    dtype=_torch_dtype(args.dtype), cpu_offload=args.cpu_offload, max_images=args.max_images,
                    max_queue=args.max_queue)
    except ImportError as error:  # gradio is an optional extra
        raise SystemExit(f"harmon demo: error: {error}") from None
    return 0


def _add_demo_parser(sub) -> None:
    web = sub.add_parser("demo", help="web app: Generate and Describe tabs (gradio; pip install \"harmon[demo]\")")
    web.add_argument("pipeline", nargs="?", default="harmon-toy", help="a HarmonPipeline folder (default: harmon-toy)")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--share", action="store_true", help="ask gradio for a public link (off by default)")
    web.add_argument("--device", help="default: cuda when available, else cpu")
    web.add_argument("--dtype", choices=sorted(DTYPES), help="default: as saved (float32 on CPU)")
    web.add_argument("--cpu-offload", action="store_true", help="keep components on the CPU between phases")
    web.add_argument("--max-images", type=positive_int, default=4, help="images per Generate request, at most")
    web.add_argument("--max-queue", type=positive_int, default=16, help="requests waiting, at most")
    web.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="harmon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text → image (or image → image with --image)")
    gen.add_argument("pipeline", nargs="?", default="harmon-toy",
                     help="a HarmonPipeline folder (default: harmon-toy, the small model shipped in the package)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="JSON list of strings or {\"prompt\": ...}, or one prompt per line")
    gen.add_argument("--image", action="append",
                     help="generate from this image's understanding embeddings instead (repeatable; --prompt is then "
                          "an optional instruction after them)")
    gen.add_argument("--out", default="outputs")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call")
    add_sampling_arguments(gen)
    gen.add_argument("--grid", action="store_true", help="also save a grid of each prompt's images")
    gen.add_argument("--grid-columns", type=int)
    gen.set_defaults(func=cmd_generate)

    desc = sub.add_parser("describe", help="image → text")
    desc.add_argument("pipeline", nargs="?", default="harmon-toy", help="a HarmonPipeline folder (default: harmon-toy)")
    desc.add_argument("--image", required=True)
    desc.add_argument("--question", default="Describe this image in detail.")
    desc.add_argument("--max-new-tokens", type=int, default=256)
    desc.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    desc.add_argument("--seed", type=int)
    desc.set_defaults(func=cmd_describe)

    conv = sub.add_parser("convert", help="original release → pipeline folder")
    conv.add_argument("--harmon", required=True, help="harmon_0.5b.pth / harmon_1.5b.pth")
    conv.add_argument("--vae", help="kl16.ckpt (default with --config: the config's vae ckpt_path)")
    conv.add_argument("--llm", help="local Qwen2.5 Instruct folder, config + tokenizer (default with --config: the "
                                    "config's llm pretrained_model_name_or_path, when it is a local folder)")
    arch = conv.add_mutually_exclusive_group(required=True)
    arch.add_argument("--preset", choices=("harmon-0.5b", "harmon-1.5b"))
    arch.add_argument("--config", "--original-config", dest="config",
                      help="the release's model config: configs/models/qwen2_5_*.py (read, not run) or its JSON "
                           "form original_config.json (HarmonPipeline.from_original(original_config=...))")
    conv.add_argument("--out", required=True)
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="components, parameter counts, dtype")
    info.add_argument("pipeline", nargs="?", default="harmon-toy", help="a HarmonPipeline folder (default: harmon-toy)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    from harmon.toy.cli import add_toy_parser  # `harmon toy train | eval`

    add_toy_parser(sub)
    _add_demo_parser(sub)
    bench = sub.add_parser("bench", add_help=False, help="benchmark layouts (geneval, dpg, wise, mjhq) and FID; "
                           "`harmon bench -h` for its commands")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    for command in (gen, desc, conv):
        command.add_argument("--dtype", choices=sorted(DTYPES), help="default: as saved (float32 on CPU)")
    for command in (gen, desc):
        command.add_argument("--device", help="default: cuda when available, else cpu")
    for command in (gen, desc, conv, info, sub.choices["demo"]):
        add_threads_argument(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (argparse's REMAINDER would refuse a leading option such as -h)
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    apply_threads(getattr(args, "threads", None))
    try:
        validate_arguments(args)
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError, KeyError) as error:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        message = " ".join(name_cli_flags(message, args.command).split())  # one line
        print(f"harmon {args.command}: error: {message}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # a refusal raised as SystemExit("message") would exit with status 1
        if not isinstance(exit_.code, str):
            raise
        prefix = "" if exit_.code.startswith("harmon") else f"harmon {args.command}: error: "
        print(f"{prefix}{exit_.code}", file=sys.stderr)
        raise UsageExit(exit_.code) from None


if __name__ == "__main__":
    sys.exit(main())
