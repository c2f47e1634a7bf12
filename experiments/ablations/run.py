"""Run one ablation study of Harmon (arXiv 2503.21979) with the training engine of :mod:`harmon.training`.

    python -m experiments.ablations.run --study unified --smoke                 # CPU, a minute or so
    python -m experiments.ablations.run --study stages --smoke --out /tmp/stages
    accelerate launch --config_file experiments/accelerate/ddp.yaml -m experiments.ablations.run \\
        --study resolution --out results/resolution                             # the full configuration
    python -m experiments.ablations.run --list
    python -m experiments.ablations.run --study encoders --check                # validate the recipes and files

Each variant is a chain of stage runs (see :mod:`experiments.ablations.config`); each run trains with
``harmon.training.trainer.Trainer`` and the :class:`~experiments.ablations.evaluation.Evaluator` callback, under
``OUT/runs/<stage>-<key>/`` (the trainer's checkpoints, export and ``eval.jsonl``). Finished runs are reused (same
key) and an interrupted one resumes from its newest checkpoint; ``--fresh`` starts over. ``--smoke`` keeps of a
finished stage run only ``export/harmon_model`` (the next stage's start, and what reuse checks): its checkpoints and
the export's pipeline copy are deleted, so smoke studies leave small results. Then it writes::

    OUT/<variant>.csv        evaluation rows over the chain's optimizer steps (+ mean training losses between them)
    OUT/table.md             the paper's table layout, last evaluation of each variant
    OUT/plots/*.png          a curve per variant for each metric, and curves.png with all of them
    OUT/summary.json         the plan (stage runs, keys, skipped stages), final values, skipped metrics, timings
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script path: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from experiments.ablations.config import (  # noqa: E402
    StageRun,
    Study,
    VariantPlan,
    list_studies,
    load_study,
    parse_sets,
    plan_study,
    resolve_evaluation,
)
from experiments.ablations.evaluation import EVAL_FILE, Evaluator, HeldOutData, read_rows  # noqa: E402
from experiments.ablations.metrics import build_metrics  # noqa: E402
from experiments.ablations.report import (  # noqa: E402
    LEAD_COLUMNS,
    final_values,
    markdown_table,
    plot_curves,
    write_csv,
)

RUN_MARKER = "ablation_run.json"


class StudyInterrupted(RuntimeError):
    """A stage run stopped before its last step (SIGTERM / SIGUSR1); running the study again resumes it."""


@dataclass
class StudyResult:
    study: Study
    smoke: bool
    out: Path
    plans: list[VariantPlan]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    finals: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run key → what happened
    files: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def prepare_synthetic(study: Study, out: Path) -> tuple[Path, Path]:
    """Write the smoke mode's shapes data (training and held-out sets) under ``OUT/data`` once."""
    from harmon.training.synthetic import write_shapes_dataset

    spec = study.smoke.synthetic
    train = out / "data" / f"shapes-{spec.count}-{spec.size}-{spec.seed}"
    heldout = out / "data" / f"shapes-{spec.heldout_count}-{spec.size}-{spec.heldout_seed}"
    if _main_process():
        for root, count, seed in ((train, spec.count, spec.seed), (heldout, spec.heldout_count, spec.heldout_seed)):
            if not (root / "llava.json").is_file():
                write_shapes_dataset(root, count=count, size=spec.size, seed=seed)
    _wait()
    return train, heldout


SMOKE_KEEPS = ("harmon_model", "export_info.json")
"""What a finished smoke run keeps of its ``export/``: the next stage starts from ``harmon_model`` and reuse checks
it; the pipeline copy beside it (the same weights again) and the run's ``checkpoints/`` are deleted."""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def prune_smoke_run(output_dir: Path) -> int:
    """Delete a finished smoke run's checkpoints and its export's pipeline copy; return the bytes freed."""
    before = _size(output_dir)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    export = output_dir / "export"
    for entry in export.iterdir() if export.is_dir() else ():
        if entry.name not in SMOKE_KEEPS:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return before - _size(output_dir)


def run_stage(run: StageRun, evaluation, heldout: HeldOutData, *, log: Callable[[str], None]) -> dict[str, Any]:
    """Train one stage run with periodic evaluation (or reuse it when it has finished before)."""
    marker = run.output_dir / RUN_MARKER
    if marker.is_file() and run.export_model_dir.is_dir():
        info = json.loads(marker.read_text())
        if info.get("key") == run.key:
            log(f"  {run.stage}: reusing finished run {run.output_dir}")
            return {**info, "reused": True}

    from accelerate.utils import DistributedType

    from harmon.training.config import load_config
    from harmon.training.trainer import Trainer

    config = load_config(data=run.config.model_dump(mode="json"), check_files=True)  # the upstream export exists now
    evaluator = Evaluator(run, evaluation, build_metrics(evaluation.metrics), heldout, log=log)
    started = time.perf_counter()
    trainer = Trainer(config, resume="auto", callbacks=[evaluator])
    if trainer.accelerator.distributed_type == DistributedType.FSDP:
        raise RuntimeError("periodic evaluation runs the unsharded model on the main process: launch the studies "
                           "with DDP or DeepSpeed ZeRO-2 (experiments/accelerate/ddp.yaml), not FSDP")
    if trainer.step > 0:
        log(f"  {run.stage}: resuming at step {trainer.step} from {trainer.resumed_from}")
        if trainer.accelerator.is_main_process:
            evaluator.resume_at(trainer.step)
    else:
        if trainer.accelerator.is_main_process and evaluator.path.exists():
            evaluator.path.unlink()  # rows of an earlier attempt that never checkpointed
        if evaluation.at_start:
            evaluator.evaluate(trainer, 0)
    result = trainer.train()
    seconds = time.perf_counter() - started
    if result.stopped_early:
        raise StudyInterrupted(f"stage run {run.output_dir} stopped at step {result.step}; run the study again "
                               "to resume it")
    info = {
        "key": run.key, "stage": run.stage, "steps": result.step, "seconds": seconds,
        "eval_seconds": evaluator.seconds, "skipped_metrics": evaluator.skipped,
        "trained": sorted(trainer.trainable), "tasks_run": sorted({k.removeprefix("loss/") for r in result.history
                                                                 for k in r if k.startswith("loss/")} - {"total"}),
    }
    if trainer.accelerator.is_main_process:
        marker.write_text(json.dumps(info, indent=2))
    trainer.accelerator.wait_for_everyone()
    return {**info, "reused": False}


def collect_rows(plan: VariantPlan) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for run in plan.runs:
        by_step: dict[int, dict[str, Any]] = {}
        for row in read_rows(run.output_dir / EVAL_FILE):
            by_step[int(row["stage_step"])] = row  # a resumed run's re-evaluation wins
        rows += [{"variant": plan.name, **by_step[s]} for s in sorted(by_step)]
    return rows


def run_study(
    study: Study | str | Path,
    *,
    smoke: bool = False,
    out: str | Path | None = None,
    variants: list[str] | None = None,
    sets: list[str] | dict[str, Any] | None = None,
    eval_every: int | None = None,
    fresh: bool = False,
    check: bool = False,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Run (or, with ``check``, only resolve and validate) a study; returns what it did and wrote."""
    started = time.perf_counter()
    if not isinstance(study, Study):
        study = load_study(study)
    mode = study.mode(smoke)
    out = Path(out) if out is not None else Path("results") / study.name
    sets = sets if isinstance(sets, dict) else parse_sets(sets)
    threads = torch.get_num_threads()
    if mode.threads:
        torch.set_num_threads(mode.threads)
    try:
        if fresh:
            if _main_process() and (out / "runs").exists():
                shutil.rmtree(out / "runs")
            _wait()
        train_root = heldout_root = None
        if mode.synthetic is not None:
            train_root, heldout_root = prepare_synthetic(study, out)
        evaluation = resolve_evaluation(mode, every=eval_every, heldout_root=heldout_root,
                                        synthetic=mode.synthetic is not None)
        build_metrics(evaluation.metrics)  # an unknown metric or bad option fails before any training
        plans = plan_study(study, smoke=smoke, out=out, evaluation=evaluation, variants=variants, sets=sets,
                           data_root=train_root, check_files=check)
        result = StudyResult(study=study, smoke=smoke, out=out, plans=plans)
        heldout = HeldOutData(evaluation.heldout)
        if check:
            heldout.check()
            for plan in plans:
                chain = " → ".join(f"{r.stage} ({r.max_steps} steps, {r.output_dir.name})" for r in plan.runs)
                log(f"{plan.name}: {chain}" + (f"; skips {', '.join(plan.skipped)}" if plan.skipped else ""))
            return result
        heldout.check()
        log(f"study {study.name} ({'smoke' if smoke else 'full'}): {len(plans)} variants → {out}")
        for plan in plans:
            log(f"variant {plan.name}: " + " → ".join(r.stage for r in plan.runs)
                + (f" (skips {', '.join(plan.skipped)})" if plan.skipped else ""))
            for run in plan.runs:
                if run.key not in result.runs:
                    result.runs[run.key] = {**run_stage(run, evaluation, heldout, log=log), "variant": plan.name}
                    if smoke and _main_process() and not result.runs[run.key]["reused"]:
                        freed = prune_smoke_run(run.output_dir)
                        log(f"  {run.stage}: smoke run, deleted its checkpoints and export pipeline copy "
                            f"({freed / 2**20:.0f} MiB; export/harmon_model kept)")
                    _wait()
                elif not result.runs[run.key].get("reused"):
                    log(f"  {run.stage}: shared with an earlier variant ({run.output_dir.name})")
        for plan in plans:
            result.rows[plan.name] = collect_rows(plan)
            result.finals[plan.name] = final_values(result.rows[plan.name])
        result.seconds = time.perf_counter() - started
        if _main_process():
            write_outputs(result, evaluation)
        _wait()
        log(f"study {study.name} done in {result.seconds:.1f} s: {out / 'table.md'}")
        return result
    finally:
        torch.set_num_threads(threads)


def write_outputs(result: StudyResult, evaluation) -> None:
    study, out, plans = result.study, result.out, result.plans
    out.mkdir(parents=True, exist_ok=True)
    mode = study.mode(result.smoke)
    stage_titles = {s.name: s.title for s in mode.stages}
    csvs = {plan.name: str(write_csv(out / f"{plan.name}.csv", result.rows[plan.name])) for plan in plans}
    table = markdown_table(study, plans, result.finals, smoke=result.smoke, stage_titles=stage_titles)
    (out / "table.md").write_text(table)
    measured = [k for rows in result.rows.values() for row in rows for k in row
                if k not in LEAD_COLUMNS and k != "eval_seconds"]
    # the study's metrics first, then any other evaluated one (an added metric), then the training losses
    metrics = list(dict.fromkeys([*study.plot_metrics, *(k for k in measured if not k.startswith("train/")),
                                  *sorted(k for k in measured if k.startswith("train/"))]))
    plots = plot_curves(study, result.rows, metrics, out / "plots",
                        titles={p.name: p.variant.title(result.smoke) for p in plans}, smoke=result.smoke)
    skipped: dict[str, str] = {}
    for info in result.runs.values():
        skipped.update(info.get("skipped_metrics", {}))
    result.files = {"csv": csvs, "table": str(out / "table.md"), "plots": [str(p) for p in plots],
                    "summary": str(out / "summary.json")}
    summary = {
        "study": study.name, "title": study.title, "reproduces": study.reproduces,
        "mode": "smoke" if result.smoke else "full", "seconds": result.seconds,
        "evaluation": evaluation.model_dump(mode="json"),
        "skipped_metrics": skipped,
        "variants": {
            plan.name: {
                "label": plan.variant.title(result.smoke),
                "skipped_stages": plan.skipped,
                "stages": [{
                    "stage": run.stage, "key": run.key, "output_dir": str(run.output_dir),
                    "max_steps": run.max_steps, "step_offset": run.step_offset,
                    "model": run.config.model.model_dump(mode="json", exclude_defaults=True),
                    "reused": result.runs[run.key].get("reused", False),  # finished in an earlier invocation
                    "run_for": result.runs[run.key]["variant"],  # the variant whose chain ran it (shared prefix)
                    "trained": result.runs[run.key].get("trained"),
                    "tasks_run": result.runs[run.key].get("tasks_run"),
                    "seconds": result.runs[run.key].get("seconds"),
                } for run in plan.runs],
                "final": result.finals[plan.name],
                "evaluations": len(result.rows[plan.name]),
            } for plan in plans
        },
        "files": result.files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablations.run",
                                     description="Run one of Harmon's training ablations.")
    parser.add_argument("--study", help=f"a study name ({', '.join(list_studies())}) or a study YAML path")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on generated shapes, on CPU")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<study>)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field of every stage (dotted, YAML value; model.* applies to the "
                        "first stage of each variant), e.g. training.max_steps=2000; repeatable")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N optimizer steps")
    parser.add_argument("--fresh", action="store_true", help="delete OUT/runs first (no reuse, no resume)")
    parser.add_argument("--check", action="store_true", help="resolve and validate every stage run, then exit")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    args = parser.parse_args(argv)
    if not args.list and not args.study:
        parser.error("--study is required (or --list)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in list_studies():
            study = load_study(name)
            print(f"{name:18s} {study.reproduces}: {study.title} ({len(study.variants)} variants)")
        return 0
    from pydantic import ValidationError

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    options = dict(smoke=args.smoke, out=args.out, variants=variants, sets=args.sets, eval_every=args.eval_every)
    try:  # resolve and validate everything (recipes, files, metrics) before anything trains
        study = load_study(args.study)
        run_study(study, check=True, log=print if args.check else (lambda _: None), **options)
    except (ValidationError, ValueError, FileNotFoundError) as error:
        print(f"invalid study {args.study}:\n{error}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.study}: valid")
        return 0
    try:
        run_study(study, fresh=args.fresh, **options)
    except StudyInterrupted as error:
        print(str(error), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
