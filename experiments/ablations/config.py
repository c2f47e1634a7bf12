"""Study files as data: the pydantic schema of ``experiments/ablations/studies/*.yaml`` and the plan they resolve to.

A study is a list of **variants** over one **mode** (``full``: the paper-scale recipes for CUDA; ``smoke``: the
``tiny`` preset on generated shapes). A mode is an ordered list of **stages**, each a training recipe of
:mod:`harmon.training` (a YAML of ``experiments/configs``) with dotted overrides. A variant differs from the
others only in configuration: more dotted overrides (for every stage, or per stage) and stages it skips.

Resolving a variant gives its **stage runs**: each a validated :class:`~harmon.training.config.TrainConfig`. The
first stage a variant runs starts from the mode's ``initial_model`` (or its recipe's own ``model`` section); every
later one from the previous stage's export (``model.pretrained``). Overrides of ``model`` / ``model.*`` therefore
apply to the first stage a variant runs only. The order in which overrides apply (later wins): the stage's
``overrides``, the mode's ``overrides``, the variant's ``overrides``, the variant's per-stage ``stages`` entry, the
command line's ``--set``.

Every stage run is keyed by a hash of its resolved recipe, of the run it starts from and of the evaluation
settings: variants that share a prefix of identical stages (the stage study's "no stage III" and the full recipe
share stages I and II) train it once, and a finished run is reused when a study is run again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from harmon.training.config import TrainConfig, apply_overrides, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDIES_DIR = Path(__file__).resolve().parent / "studies"
PLAN_VERSION = 1
"""Part of every run key: bump it when the runner changes what a run computes."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r}: use letters, digits, '_', '-', '.' (it names files)")
    return value


# -------------------------------------------------------------------------------------------------- evaluation
class HeldOut(_Strict):
    """Held-out data the metrics read. ``captions``: image-caption pairs in the release layout (a ``data_info``
    JSON; the diffusion loss and FID prompts); ``qa``: LLaVA-style conversations (the first turn of each is one
    question with its reference answer). Relative paths resolve against ``root`` (default: the working directory).
    A smoke mode with ``synthetic`` data fills these in itself."""

    root: Path | None = None
    captions: Path | None = None
    qa: Path | None = None
    max_samples: PositiveInt = Field(64, description="at most this many pairs / questions of each")

    def resolve(self, path: Path | None) -> Path | None:
        if path is None or path.is_absolute() or self.root is None:
            return path
        return self.root / path


class EvaluationConfig(_Strict):
    every: PositiveInt = Field(1000, description="evaluate every this many optimizer steps (and at a stage's end)")
    at_start: bool = Field(True, description="also evaluate before each stage's first step")
    image_size: PositiveInt | None = Field(
        None, description="pixels of the evaluation images; None: the running stage's data.image_size"
    )
    batch_size: PositiveInt = 8
    seed: int = 0
    heldout: HeldOut = HeldOut()
    metrics: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"diffusion_loss": {}, "qa_loss": {}, "qa": {}},
        description="metric name (registered, or 'package.module:factory') → its options",
    )


# ------------------------------------------------------------------------------------------------------ stages
class StageSpec(_Strict):
    name: str
    recipe: Path = Field(description="a training recipe YAML; relative paths resolve against the repository root")
    label: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "stage name")

    @property
    def recipe_path(self) -> Path:
        return self.recipe if self.recipe.is_absolute() else REPO_ROOT / self.recipe

    @property
    def title(self) -> str:
        return self.label or self.name


class SyntheticData(_Strict):
    """Shapes data written by :func:`harmon.training.synthetic.write_shapes_dataset`: a training set (every
    stage's ``data.root``) and a held-out set drawn with another seed (the metrics' captions and questions)."""

    count: PositiveInt = 48
    heldout_count: PositiveInt = 16
    size: PositiveInt = 64
    seed: int = 0
    heldout_seed: int = 1


class ModeConfig(_Strict):
    stages: list[StageSpec] = Field(min_length=1)
    initial_model: dict[str, Any] | None = Field(
        None, description="the `model` section of the first stage a variant runs (default: that recipe's own)"
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="for every stage of every variant")
    evaluation: EvaluationConfig = EvaluationConfig()
    synthetic: SyntheticData | None = None
    threads: PositiveInt | None = Field(None, description="torch intra-op threads (smoke: 1 suits the tiny model)")
    launch: str | None = Field(None, description="how this mode is meant to be launched (documentation)")

    @model_validator(mode="after")
    def _unique_stages(self) -> "ModeConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        return self

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


class VariantChange(_Strict):
    overrides: dict[str, Any] = Field(default_factory=dict, description="for every stage this variant runs")
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict, description="stage name → overrides")
    skip_stages: list[str] = Field(default_factory=list)


class Variant(_Strict):
    name: str
    label: str | None = None
    smoke_label: str | None = Field(None, description="the label in smoke mode (default: label)")
    description: str = ""
    full: VariantChange = VariantChange()
    smoke: VariantChange | None = Field(None, description="the smoke mode's change; None: the same as full")
    cells: dict[str, str] = Field(default_factory=dict, description="extra table cells: column header → text")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "variant name")

    def change(self, smoke: bool) -> VariantChange:
        return self.smoke if smoke and self.smoke is not None else self.full

    def title(self, smoke: bool = False) -> str:
        return (self.smoke_label if smoke and self.smoke_label else None) or self.label or self.name


# ------------------------------------------------------------------------------------------------------ report
class TableColumn(_Strict):
    metric: str
    header: str
    format: str = ".4f"
    better: Literal["lower", "higher"] | None = None


class TableSpec(_Strict):
    caption: str
    row_header: str = "Variant"
    cell_columns: list[str] = Field(default_factory=list, description="headers of the variants' `cells`")
    stage_marks: bool = Field(False, description="a ✓ / – column per stage (which stages the variant ran)")
    columns: list[TableColumn] = Field(min_length=1)


class Study(_Strict):
    name: str
    title: str
    reproduces: str = Field(description="what of the paper this reproduces (table / figure)")
    description: str = ""
    variants: list[Variant] = Field(min_length=2)
    full: ModeConfig
    smoke: ModeConfig
    table: TableSpec
    plots: list[str] | None = Field(None, description="metrics to plot over steps; default: the table's")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "study name")

    @model_validator(mode="after")
    def _variants_fit_modes(self) -> "Study":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        for variant in self.variants:
            for smoke, mode in ((False, self.full), (True, self.smoke)):
                change = variant.change(smoke)
                known = [s.name for s in mode.stages]
                label = f"variants[{variant.name}].{'smoke' if smoke else 'full'}"
                for name in [*change.skip_stages, *change.stages]:
                    if name not in known:
                        raise ValueError(f"{label}: unknown stage {name!r} (the {'smoke' if smoke else 'full'} "
                                         f"mode's stages: {known})")
                if all(name in change.skip_stages for name in known):
                    raise ValueError(f"{label}: every stage is skipped")
        return self

    def mode(self, smoke: bool) -> ModeConfig:
        return self.smoke if smoke else self.full

    @property
    def plot_metrics(self) -> list[str]:
        return list(self.plots) if self.plots is not None else [c.metric for c in self.table.columns]


def list_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def study_path(name_or_path: str | Path) -> Path:
    """A study by name (``studies/<name>.yaml``) or a path to a study YAML."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"study file not found: {path}")
        return path
    candidate = STUDIES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise FileNotFoundError(f"unknown study {str(name_or_path)!r}; known: {', '.join(list_studies())}")
    return candidate


def load_study(name_or_path: str | Path) -> Study:
    path = study_path(name_or_path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a study is a YAML mapping")
    return Study.model_validate(data)


# -------------------------------------------------------------------------------------------------------- plan
@dataclass
class StageRun:
    """One training run of a variant's chain: a resolved recipe and where it goes."""

    stage: str
    config: TrainConfig
    key: str
    output_dir: Path
    step_offset: int  # optimizer steps of the variant's earlier stages (the x axis over the whole chain)
    first: bool

    @property
    def max_steps(self) -> int:
        return self.config.training.max_steps

    @property
    def export_model_dir(self) -> Path:
        return self.output_dir / "export" / "harmon_model"


@dataclass
class VariantPlan:
    variant: Variant
    runs: list[StageRun]
    skipped: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.variant.name


def _is_model_key(key: str) -> bool:
    return key == "model" or key.startswith("model.")


def _split(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {k: v for k, v in overrides.items() if _is_model_key(k)}
    rest = {k: v for k, v in overrides.items() if not _is_model_key(k)}
    return model, rest


def _run_key(config_data: dict[str, Any], upstream: str | None, evaluation: EvaluationConfig) -> str:
    payload = json.dumps(
        {"version": PLAN_VERSION, "config": config_data, "upstream": upstream,
         "evaluation": evaluation.model_dump(mode="json")},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (YAML values) → a dict of dotted overrides."""
    out: dict[str, Any] = {}
    for text in sets or []:
        if "=" not in text:
            raise ValueError(f"--set {text!r}: expected KEY=VALUE")
        key, value = text.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_evaluation(mode: ModeConfig, *, every: int | None = None, heldout_root: Path | None = None,
                       synthetic: bool = False) -> EvaluationConfig:
    evaluation = mode.evaluation.model_copy(deep=True)
    if every is not None:
        evaluation.every = every
    if synthetic and heldout_root is not None:
        evaluation.heldout = HeldOut(root=heldout_root, captions=Path("data_info.json"), qa=Path("llava.json"),
                                     max_samples=evaluation.heldout.max_samples)
    return evaluation


def plan_variant(
    study: Study,
    variant: Variant,
    *,
    smoke: bool,
    out: Path,
    evaluation: EvaluationConfig,
    sets: dict[str, Any] | None = None,
    data_root: Path | None = None,
    check_files: bool = False,
) -> VariantPlan:
    """The stage runs of ``variant`` (recipes resolved and validated; nothing is built or trained)."""
    mode = study.mode(smoke)
    change = variant.change(smoke)
    sets = sets or {}
    runs: list[StageRun] = []
    skipped = [s.name for s in mode.stages if s.name in change.skip_stages]
    upstream: StageRun | None = None
    first_model: dict[str, Any] = {}
    offset = 0
    for spec in mode.stages:
        if spec.name in change.skip_stages:
            continue
        path = spec.recipe_path
        if not path.is_file():
            raise FileNotFoundError(f"stage {spec.name}: recipe not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        layers = [spec.overrides, mode.overrides, change.overrides, change.stages.get(spec.name, {}), sets]
        model_layers, rest_layers = zip(*(_split(layer) for layer in layers))
        recipe_model = data.get("model") or {}
        if upstream is None:
            data["model"] = copy.deepcopy(mode.initial_model) if mode.initial_model is not None else recipe_model
            for layer in model_layers:
                data = apply_overrides(data, copy.deepcopy(layer))
        else:
            data["model"] = {"pretrained": str(upstream.export_model_dir),
                             "image_token": recipe_model.get("image_token", "<image>")}
        for layer in rest_layers:
            data = apply_overrides(data, copy.deepcopy(layer))
        if data_root is not None:
            data = apply_overrides(data, {"data.root": str(data_root)})
        data.pop("output_dir", None)
        data.pop("run_name", None)
        key = _run_key(data, upstream.key if upstream else None, evaluation)
        output_dir = out / "runs" / f"{spec.name}-{key}"
        data["output_dir"] = str(output_dir)
        data["run_name"] = f"{study.name}-{spec.name}-{key}"
        label = f"study {study.name}, variant {variant.name}, stage {spec.name}"
        try:
            config = load_config(data=data, check_files=False)
            if check_files:  # a later stage's model is the previous export, not written yet: probe the first's
                probe = data if upstream is None else {**data, "model": first_model}
                load_config(data=probe, check_files=True)
        except ValueError as error:  # pydantic's ValidationError included
            raise ValueError(f"{label} ({path}): {error}") from error
        if upstream is None:
            first_model = copy.deepcopy(data["model"])
        run = StageRun(stage=spec.name, config=config, key=key, output_dir=output_dir, step_offset=offset,
                       first=upstream is None)
        runs.append(run)
        upstream = run
        offset += config.training.max_steps
    return VariantPlan(variant=variant, runs=runs, skipped=skipped)


def plan_study(study: Study, *, smoke: bool, out: Path, evaluation: EvaluationConfig,
               variants: list[str] | None = None, sets: dict[str, Any] | None = None,
               data_root: Path | None = None, check_files: bool = False) -> list[VariantPlan]:
    chosen = study.variants
    if variants:
        known = {v.name for v in study.variants}
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown} of study {study.name}; known: {sorted(known)}")
        chosen = [v for v in study.variants if v.name in variants]
    return [
        plan_variant(study, v, smoke=smoke, out=out, evaluation=evaluation, sets=sets, data_root=data_root,
                     check_files=check_files)
        for v in chosen
    ]


__all__ = [
    "EvaluationConfig", "HeldOut", "ModeConfig", "REPO_ROOT", "STUDIES_DIR", "StageRun", "StageSpec", "Study",
    "SyntheticData", "TableColumn", "TableSpec", "Variant", "VariantChange", "VariantPlan", "list_studies",
    "load_study", "parse_sets", "plan_study", "plan_variant", "resolve_evaluation", "study_path",
]
