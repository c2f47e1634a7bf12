"""The trainer: one stage recipe on accelerate (single process, DDP, FSDP or DeepSpeed ZeRO-2 — whatever
``accelerate launch`` was configured with).

Per micro-batch (one task, see :mod:`harmon.training.sampler`): the task's loss through
:class:`~harmon.training.modules.HarmonTrainingModule`, times its ``loss_weights`` entry, back-propagated under
``accelerator.accumulate`` (global batch = micro batch × processes × accumulation steps). Per optimizer step:
gradient clipping, AdamW (one parameter group per module), the warm-up + cosine / constant schedule, logging
(per-task losses, per-module learning rates) to accelerate's trackers and ``metrics.jsonl``, and every
``checkpoint_every`` steps an atomic checkpoint (:mod:`harmon.training.checkpointing`). At the last step the
weights are exported (:mod:`harmon.training.export`).

Resuming restores the model, optimizer, scheduler and every process's RNG (accelerate's ``load_state``) and the
data position (the micro-step count): a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from harmon.checkpoints import load_state_dict_strict
from harmon.model import HarmonModel
from harmon.training.checkpointing import (
    TRAINER_STATE_NAME,
    CheckpointError,
    CheckpointManager,
    check_rng_state,
    read_trainer_state,
    truncate_metrics,
    verify_checkpoint,
    write_json_atomic,
)
from harmon.training.collator import HarmonCollator
from harmon.training.config import TASKS, TrainConfig, dump_config
from harmon.training.data import MultiTaskDataset
from harmon.training.export import export_model
from harmon.training.guards import check_launch, check_output_dir, clear_previous_run
from harmon.training.messages import explain_shared_tensors
from harmon.training.modules import (
    HarmonTrainingModule,
    apply_freezing,
    build_model,
    enable_gradient_checkpointing,
    image_token_id,
    load_tokenizer,
    parameter_groups,
    understanding_tokens,
)
from harmon.training.sampler import MultiTaskBatchSampler, TaskSchedule
from harmon.training.synthetic import ensure_shapes_dataset

logger = get_logger(__name__)

_STEP_SEED_TAG = 0x5EED


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    export_info: dict[str, Any] | None = None
    stopped_early: bool = False


def resolve_mixed_precision(requested: str) -> str:
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return requested


def resolve_trackers(requested: str) -> list[str] | None:
    from accelerate.utils import is_tensorboard_available

    if requested == "none":
        return None
    if is_tensorboard_available():
        return ["tensorboard"]
    if requested == "tensorboard":
        raise ValueError("training.log_with: tensorboard is not installed (pip install 'harmon[train]')")
    return None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """A config as scalar hyper-parameters (what trackers accept)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    value = data if isinstance(data, (int, float, str, bool)) else json.dumps(data)
    return {prefix[:-1]: value}


class Trainer:
    """Builds everything a recipe names; :meth:`train` runs it.

    ``resume``: ``None`` (fresh run), ``"latest"`` (the newest checkpoint under ``output_dir/checkpoints``; an
    error if there is none), ``"auto"`` (the newest if any, else a fresh run) or a checkpoint folder.
    ``stop_after``: stop (with a checkpoint) after this optimizer step, as a pre-empted job would.
    ``callbacks``: callables ``callback(trainer, record)`` run on every process after each optimizer step's
    record (``record["step"]`` is the step just taken), before that step's checkpoint — e.g. a periodic
    evaluation. A callback that uses the model must leave it in training mode and must not draw from the global
    random streams (wrap such code in ``torch.random.fork_rng``), so that the run stays what it would be without it.
    A fresh run (``resume=None``) into an ``output_dir`` holding an earlier run is refused
    (:class:`~harmon.training.guards.OutputDirError`) unless ``overwrite``, which deletes that run's artefacts.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: str | Path | None = None,
        stop_after: int | None = None,
        callbacks: Sequence[Callable[["Trainer", dict[str, Any]], None]] = (),
        overwrite: bool = False,
    ):
        self.config = config
        self.stop_after = stop_after
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)
        training = config.training
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(training.mixed_precision),
            log_with=resolve_trackers(training.log_with),
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            # each micro-batch runs one task, which leaves some modules without gradient
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            # the schedule counts optimizer steps; it is stepped by hand once per optimizer step
            step_scheduler_with_optimizer=False,
        )
        accelerator = self.accelerator
        check_launch(accelerator.num_processes)
        stale_run = check_output_dir(self.output_dir, resume=resume, overwrite=overwrite)
        world = accelerator.num_processes
        per_step = training.micro_batch_size * world
        if training.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size ({training.global_batch_size}) is not a multiple of "
                f"training.micro_batch_size ({training.micro_batch_size}) × {world} process(es)"
            )
        self.accumulation = training.global_batch_size // per_step
        accelerator.gradient_accumulation_steps = self.accumulation
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # the batch geometry comes from the recipe, not from the DeepSpeed section of the launch config
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = training.micro_batch_size
            ds["gradient_accumulation_steps"] = self.accumulation
            ds["train_batch_size"] = training.global_batch_size
            ds["gradient_clipping"] = config.optimizer.max_grad_norm or 0.0

        set_seed(config.seed)
        model = build_model(config.model)
        self.tokenizer = load_tokenizer(config.model)
        self.image_token_id = image_token_id(self.tokenizer, model, config.model.image_token)
        stride = model.config.latent_stride
        if config.data.image_size % stride:
            raise ValueError(
                f"data.image_size ({config.data.image_size}) is not a multiple of the latent stride {stride}"
            )
        self.model_config = model.config
        self.trainable = apply_freezing(model, config)
        self.checkpointed_modules = enable_gradient_checkpointing(model) if training.gradient_checkpointing else []
        self.model = model
        self.module = HarmonTrainingModule(model, self.image_token_id, config.condition_probes,
                                           training.latent_cache_size).train()

        groups = parameter_groups(self.trainable, config)
        if self.module.probes is not None:  # training-only classifiers (harmon.training.probes): no weight decay
            groups.append({"params": list(self.module.probes.parameters()), "lr": config.condition_probes.lr,
                           "weight_decay": 0.0, "module": "condition_probes", "name": "condition_probes"})
        self._probe_window: list[dict[str, torch.Tensor]] = []
        self.optimizer = torch.optim.AdamW(
            groups, betas=tuple(config.optimizer.betas), eps=config.optimizer.eps,
            weight_decay=config.optimizer.weight_decay,
        )
        self.scheduler = self._schedule(self.optimizer)

        synthetic = config.data.synthetic
        if synthetic is not None and accelerator.is_main_process:
            if ensure_shapes_dataset(config.data.root, count=synthetic.count, size=synthetic.size, seed=synthetic.seed):
                logger.info(f"wrote the synthetic shapes data to {config.data.root}", main_process_only=True)
        accelerator.wait_for_everyone()
        self.dataset = MultiTaskDataset(config.data, config.condition_probes)
        self.schedule = TaskSchedule(config.data.ratios.as_dict(), config.seed)
        self.collator = HarmonCollator(
            self.tokenizer,
            image_token_id=self.image_token_id,
            image_tokens=understanding_tokens(model, config.data.image_size),
            prompt_template=model.config.prompt_template,
            generation_prefix=model.config.generation_prefix,
            unconditional_prompt=model.config.unconditional_prompt,
            max_length=config.data.max_length,
            max_prompt_length=config.data.max_prompt_length,
            cfg_drop_prob=config.data.cfg_drop_prob,
            seed=config.seed,
            image_token=config.model.image_token,
            reconstruction_instruction=config.data.reconstruction_instruction,
        )
        self.module, self.optimizer, self.scheduler = accelerator.prepare(self.module, self.optimizer, self.scheduler)
        explain_shared_tensors(accelerator.unwrap_model(self.module), logger)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", training.keep_last)
        self.step = 0
        self.micro_step = 0
        if stale_run:  # --overwrite: everything is built, only now is the earlier run deleted
            if accelerator.is_main_process:
                clear_previous_run(self.output_dir)
                logger.info(f"--overwrite: deleted {', '.join(stale_run)} in {self.output_dir}", main_process_only=True)
            accelerator.wait_for_everyone()
        self.resumed_from = self._load(resume)

    # -------------------------------------------------------------------------------------------------- setup
    def _schedule(self, optimizer):
        schedule, total = self.config.schedule, self.config.training.max_steps
        warmup = min(schedule.warmup_steps, total)
        if schedule.name == "constant":
            return get_constant_schedule_with_warmup(optimizer, warmup)
        if schedule.min_lr_ratio > 0:
            return get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, warmup, total, min_lr_rate=schedule.min_lr_ratio
            )
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)

    def _resolve_resume(self, resume: str | Path | None) -> Path | None:
        if resume is None or resume is False:
            return None
        if resume in ("auto", "latest", True):
            latest = self.checkpoints.latest()
            if latest is None and resume != "auto":
                raise CheckpointError(f"--resume latest: no checkpoint in {self.checkpoints.root}")
            return latest
        return Path(resume)

    def _load(self, resume: str | Path | None) -> Path | None:
        path = self._resolve_resume(resume)
        if path is None:
            return None
        accelerator = self.accelerator
        # verify once (on the main process) and share the verdict, so that every process refuses together
        verdict = [None]
        if accelerator.is_main_process:
            try:
                verify_checkpoint(path)
            except CheckpointError as error:
                verdict[0] = str(error)
        if accelerator.num_processes > 1:
            broadcast_object_list(verdict)
        if verdict[0] is not None:
            hint = ", ".join(p.name for p in self.checkpoints.list() if p != path) or "none"
            raise CheckpointError(f"{verdict[0]} (other checkpoints: {hint}; pass one with --resume PATH)")
        state = read_trainer_state(path)
        if state.get("global_batch_size") != self.config.training.global_batch_size:
            logger.warning(
                f"resuming {path} written with global batch {state.get('global_batch_size')}, now "
                f"{self.config.training.global_batch_size}"
            )
        check_rng_state(path, accelerator.process_index)  # accelerate only logs a state it cannot load
        accelerator.load_state(str(path))
        self.step = int(state["step"])
        self.micro_step = int(state["micro_step"])
        if accelerator.is_main_process:  # a killed run logged past this checkpoint: those steps run again
            truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        logger.info(f"resumed from {path} at step {self.step}", main_process_only=True)
        return path

    def dataloader(self, start: int, stop: int) -> DataLoader:
        accelerator = self.accelerator
        sampler = MultiTaskBatchSampler(
            self.schedule,
            {task: self.dataset.task_size(task) for task in TASKS},
            self.config.training.micro_batch_size,
            seed=self.config.seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            start=start,
            stop=stop,
        )
        workers = self.config.data.num_workers
        # not accelerator.prepare()d: the sampler shards by rank itself (see harmon.training.sampler); its own
        # generator keeps the DataLoader from drawing from the global RNG (which a resume restores)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.config.seed),
            prefetch_factor=4 if workers else None,
        )

    def _step_generator(self, micro_step: int) -> torch.Generator:
        seed = np.random.SeedSequence((self.config.seed, _STEP_SEED_TAG, micro_step, self.accelerator.process_index))
        return torch.Generator().manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0] >> 1))

    # --------------------------------------------------------------------------------------------------- train
    def learning_rates(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    def train(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        training = config.training
        result = TrainResult(step=self.step)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(config))
        if accelerator.trackers == [] and accelerator.log_with:
            accelerator.init_trackers(config.run_name, config=_flat(config.model_dump(mode="json")))
        weights = config.loss_weights.model_dump()
        target = training.max_steps if self.stop_after is None else min(training.max_steps, self.stop_after)

        stop_requested = _StopFlag()
        progress = tqdm(
            total=training.max_steps, initial=self.step, disable=not accelerator.is_main_process, desc="train",
            dynamic_ncols=True,
        )
        window: dict[str, list[torch.Tensor]] = defaultdict(list)
        interval: dict[str, list[float]] = defaultdict(list)
        started = time.perf_counter()
        last_checkpoint = None
        try:
            stop_requested.install()
            loader = self.dataloader(self.micro_step, target * self.accumulation)
            for batch in loader:
                task = batch["task"]
                batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                with accelerator.accumulate(self.module):
                    loss = self.module(batch, generator=self._step_generator(self.micro_step))
                    accelerator.backward(loss * weights[task])
                    grad_norm = None
                    if accelerator.sync_gradients and config.optimizer.max_grad_norm:
                        # all the module's parameters (frozen ones have no gradient): what FSDP's clipping expects
                        grad_norm = accelerator.clip_grad_norm_(
                            self.module.parameters(), config.optimizer.max_grad_norm
                        )
                    self.optimizer.step()
                    if accelerator.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window[task].append(loss.detach().float())
                if task == "text_to_image" and config.condition_probes is not None:
                    self._probe_window.append(accelerator.unwrap_model(self.module).last_probe_metrics)
                self.micro_step += 1
                if not accelerator.sync_gradients:
                    continue

                self.step += 1
                record = self._record(window, weights, grad_norm)
                window.clear()
                result.history.append(record)
                for key, value in record.items():
                    interval[key].append(value)
                progress.update(1)
                progress.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in record.items() if k.startswith("loss/")})
                if self.step % training.log_every == 0 or self.step == target:
                    self._log(interval, started)
                    interval.clear()
                for callback in self.callbacks:
                    callback(self, record)
                stop = self.step >= target or stop_requested.agreed(accelerator)
                if self.step % training.checkpoint_every == 0 or stop:
                    last_checkpoint = self.save_checkpoint()
                if stop:
                    break
        finally:
            stop_requested.uninstall()
            progress.close()
        result.step = self.step
        result.checkpoint = last_checkpoint
        result.stopped_early = self.step < training.max_steps
        if not result.stopped_early:
            result.export_dir = self.output_dir / "export"
            result.export_info = self.export(result.export_dir)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result

    def _record(self, window, weights, grad_norm) -> dict[str, Any]:
        accelerator = self.accelerator
        tasks = sorted(window)
        losses = torch.stack([torch.stack(window[t]).mean() for t in tasks]).to(accelerator.device)
        counts = [len(window[t]) for t in tasks]
        if accelerator.num_processes > 1:
            losses = accelerator.reduce(losses, reduction="mean")
        record: dict[str, Any] = {"step": self.step}
        total = 0.0
        for task, value, count in zip(tasks, losses.tolist(), counts):
            record[f"loss/{task}"] = value
            total += weights[task] * value * count
        record["loss/total"] = total / self.accumulation
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self._probe_window:  # condition probes (this process's micro-batches); their loss is in text_to_image's
            for key in self._probe_window[0]:
                values = torch.stack([m[key].float() for m in self._probe_window])
                values = values[~values.isnan()]  # a target with no label in a micro-batch (NaN) counts for nothing
                if values.numel():
                    record[key] = float(values.mean())
            self._probe_window.clear()
        for group in self.optimizer.param_groups:
            if not group["name"].endswith("/no_decay"):
                record[f"lr/{group['name']}"] = group["lr"]
        return record

    def _log(self, interval: dict[str, list[float]], started: float) -> None:
        accelerator = self.accelerator
        values = {k: float(np.mean(v)) for k, v in interval.items() if k != "step"}
        values["time/seconds"] = time.perf_counter() - started
        accelerator.log(values, step=self.step)
        if accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": self.step, **values}) + "\n")

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        accelerator = self.accelerator
        tmp = self.checkpoints.temp_dir(self.step)
        if accelerator.is_main_process:
            self.checkpoints.prepare(self.step)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        final = self.checkpoints.root / tmp.name.removeprefix(".tmp-")
        if accelerator.is_main_process:
            training = self.config.training
            write_json_atomic(tmp / TRAINER_STATE_NAME, {
                "step": self.step,
                "micro_step": self.micro_step,
                "num_processes": accelerator.num_processes,
                "global_batch_size": training.global_batch_size,
                "micro_batch_size": training.micro_batch_size,
                "seed": self.config.seed,
            })
            (tmp / "config.yaml").write_text(dump_config(self.config))
            final = self.checkpoints.commit(tmp, self.step, {"run_name": self.config.run_name})
            logger.info(f"checkpoint {final}", main_process_only=True)
        accelerator.wait_for_everyone()
        return final

    # -------------------------------------------------------------------------------------------------- export
    def export(self, folder: Path) -> dict[str, Any] | None:
        """Gather the full weights (FSDP shards included) into a fresh model and export it (main process)."""
        accelerator = self.accelerator
        state = accelerator.get_state_dict(self.module)
        info = None
        if accelerator.is_main_process:
            # the training module's own parts (the condition probes) are not the model's: never exported
            state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("probes.")}
            model = HarmonModel.from_config(self.model_config)
            load_state_dict_strict(model, {k: v.detach().float().cpu() for k, v in state.items()}, "trained weights")
            info = export_model(model, self.tokenizer, folder, {
                "step": self.step, "run_name": self.config.run_name, "stage": self.config.stage,
            })
            logger.info(f"exported to {folder}", main_process_only=True)
        accelerator.wait_for_everyone()
        return info


class _StopFlag:
    """SIGTERM / SIGUSR1 (a scheduler's pre-emption notice) → checkpoint at the next optimizer step and stop."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def train(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    callbacks: Sequence[Callable[[Trainer, dict[str, Any]], None]] = (),
    overwrite: bool = False,
) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` and run it."""
    return Trainer(config, resume=resume, stop_after=stop_after, callbacks=callbacks, overwrite=overwrite).train()


__all__ = ["Trainer", "TrainResult", "train", "resolve_mixed_precision", "resolve_trackers"]
