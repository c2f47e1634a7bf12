"""experiments/ablations: every study's smoke run end to end (with fewer steps and evaluations than the CLI's
--smoke), the artefacts they write, proofs that the variants differ as named, the full configurations at the
config level, the metrics, and the engine hooks the runner relies on (``model.config_overrides``,
``Trainer(callbacks=...)``).

CPU, tiny preset, synthetic shapes written into tmp_path; torch on one intra-op thread (see tests/test_training.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reset_accelerate_state
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ lives at the repository root

from experiments.ablations import run as runner  # noqa: E402
from experiments.ablations.config import (  # noqa: E402
    EvaluationConfig,
    Study,
    list_studies,
    load_study,
    plan_study,
    study_path,
)
from experiments.ablations.metrics import (  # noqa: E402
    FID,
    METRICS,
    MetricSkipped,
    build_metric,
    exact_match,
    lenient_match,
    register_metric,
)
from experiments.ablations.report import read_csv  # noqa: E402
from harmon.model import HarmonModel  # noqa: E402
from harmon.training.config import load_config  # noqa: E402

STUDIES = ("encoders", "shared_decoupled", "unified", "stages", "resolution")
FEW_STEPS = {"unified": 6, "shared_decoupled": 4, "stages": 3, "resolution": 3, "encoders": 3}
EVAL_EVERY = {"unified": 3}  # the others: at each stage's start and end only


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


def quiet(_: str) -> None:
    pass


def smoke_run(name: str, out: Path, *, variants=None, eval_every=None, study=None, **kwargs):
    return runner.run_study(study or load_study(name), smoke=True, out=out, variants=variants,
                            sets={"training.max_steps": FEW_STEPS[name]},
                            eval_every=eval_every or EVAL_EVERY.get(name, FEW_STEPS[name]), log=quiet, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each study run once (lazily) and shared by the tests below."""
    cache: dict[str, runner.StudyResult] = {}

    def get(name: str):
        if name not in cache:
            reset_accelerate_state()
            out = tmp_path_factory.mktemp(name)
            if name == "shared_decoupled":  # also proves the metric extension point: a metric registered here
                study = load_study(name)
                study.smoke.evaluation.metrics["test-visual-norm"] = {}
                cache[name] = smoke_run(name, out, study=study)
            elif name == "encoders":  # one decoupled pixel encoder and the shared MAR end to end
                cache[name] = smoke_run(name, out, variants=["vae", "mar"])
            else:
                cache[name] = smoke_run(name, out)
        return cache[name]

    return get


@register_metric("test-visual-norm", title={"test/visual_norm": ("mean visual-embedding norm", None)})
class VisualNorm:
    """A metric from outside the package: the mean norm of the understanding path's embeddings."""

    def __call__(self, ctx) -> dict[str, float]:
        batch, _ = next(ctx.qa_batches())
        return {"test/visual_norm": float(ctx.model.image_embeddings(batch["pixels"]).norm(dim=-1).mean())}


def summary(result) -> dict:
    return json.loads((result.out / "summary.json").read_text())


def check_artefacts(result, metrics: list[str]) -> None:
    data = summary(result)
    assert set(data["variants"]) == {p.name for p in result.plans}
    for plan in result.plans:
        rows = read_csv(result.out / f"{plan.name}.csv")
        assert rows, plan.name
        assert rows[0]["step"] == 0 and rows[-1]["step"] == sum(r.max_steps for r in plan.runs)
        for metric in metrics:
            values = [row[metric] for row in rows]
            assert len(values) == len(rows) and all(torch.isfinite(torch.tensor(values))), (plan.name, metric)
        for run in plan.runs:
            assert (run.export_model_dir / "model.safetensors").is_file()
    table = (result.out / "table.md").read_text()
    for plan in result.plans:
        assert f"| {plan.variant.title(True)} |" in table
    assert "smoke run" in table
    plots = result.out / "plots"
    assert (plots / "curves.png").stat().st_size > 1000
    for metric in metrics:
        assert (plots / f"{metric.replace('/', '_')}.png").is_file()


def initial_model(run) -> HarmonModel:
    """The model a stage run started from, rebuilt as the trainer builds it (seed, then model)."""
    from accelerate.utils import set_seed

    from harmon.training.modules import build_model

    set_seed(run.config.seed)
    return build_model(run.config.model)


def exported(run) -> HarmonModel:
    return HarmonModel.from_pretrained(run.export_model_dir)


# ----------------------------------------------------------------------------------------------- config level
def test_every_study_loads_and_resolves_in_both_modes(tmp_path):
    assert sorted(STUDIES) == list_studies()
    for name in STUDIES:
        study = load_study(name)
        for smoke in (False, True):
            plans = plan_study(study, smoke=smoke, out=tmp_path / name, evaluation=EvaluationConfig())
            assert [p.name for p in plans] == [v.name for v in study.variants]
            for plan in plans:
                assert plan.runs and all(r.output_dir.parent == tmp_path / name / "runs" for r in plan.runs)
                first, *later = plan.runs
                for previous, run in zip(plan.runs, later):  # each later stage starts from the one before
                    assert run.config.model.pretrained == previous.export_model_dir
                if smoke:
                    assert first.config.model.preset == "tiny"
                elif first.config.model.preset is None:  # a prepared initial model (the encoders study's MAR)
                    assert first.config.model.pretrained == Path("checkpoints/harmon-0.5b-mar-init")
                else:
                    assert first.config.model.preset == "harmon-0.5b" and first.config.model.llm_weights


def test_full_configurations_are_the_paper_scale_recipes(tmp_path):
    plans = {n: plan_study(load_study(n), smoke=False, out=tmp_path, evaluation=EvaluationConfig())
             for n in STUDIES}
    stage3 = {p.name: p.runs[-1].config.data.image_size for p in plans["resolution"]}
    assert stage3 == {"res256": 256, "res384": 384, "res512": 512}
    decoupled = plans["shared_decoupled"][1].runs[0].config.model.config_overrides["understanding_encoder"]
    assert decoupled["name"] == "siglip-base-patch16-256" and decoupled["pretrained"]  # weights: not in its config
    encoders = {p.name: p.runs[0].config.model for p in plans["encoders"]}
    assert {k: m.config_overrides.get("understanding_encoder", {}).get("name") for k, m in encoders.items()} == {
        "siglip": "siglip-base-patch16-256", "vqgan": "vqgan-f16", "vae": "vae-kl16", "mar": None}
    for plan in plans["encoders"]:
        assert all(r.config.data.ratios.text_to_image == 0 for r in plan.runs)
    ratios = {p.name: p.runs[0].config.data.ratios.as_dict() for p in plans["unified"]}
    assert ratios["und_only"]["text_to_image"] == 0 and ratios["gen_only"]["image_to_text"] == 0
    assert ratios["unified"] == {"text": 1, "image_to_text": 3, "text_to_image": 8, "reconstruction": 0}
    stages = {p.name: [r.stage for r in p.runs] for p in plans["stages"]}
    assert stages == {"all": ["stage1", "stage2", "stage3"], "no_stage1": ["stage2", "stage3"],
                      "no_stage2": ["stage1", "stage3"], "no_stage3": ["stage1", "stage2"]}
    # the stage recipes are the repository's, unchanged but for the chain's model source
    recipe = load_config(REPO / "experiments/configs/stage2_harmon-0.5b.yaml", check_files=False)
    run = plans["stages"][0].runs[1]
    assert run.config.learning_rates == recipe.learning_rates and run.config.training == recipe.training
    assert run.config.data.model_dump(exclude={"root"}) == recipe.data.model_dump(exclude={"root"})


def test_variants_sharing_a_stage_prefix_share_its_runs(tmp_path):
    plans = {p.name: p for p in plan_study(load_study("stages"), smoke=True, out=tmp_path,
                                           evaluation=EvaluationConfig())}
    key = {name: [r.key for r in plan.runs] for name, plan in plans.items()}
    assert key["all"][0] == key["no_stage2"][0] == key["no_stage3"][0]
    assert key["all"][:2] == key["no_stage3"]
    assert key["no_stage1"][0] not in key["all"]  # stage II from the initial model is another run
    assert key["no_stage2"][1] != key["all"][2]  # so is stage III after stage I
    res = plan_study(load_study("resolution"), smoke=True, out=tmp_path, evaluation=EvaluationConfig())
    assert len({tuple(r.key for r in p.runs[:2]) for p in res}) == 1 and len({p.runs[2].key for p in res}) == 3


def test_bad_study_files_fail_naming_the_problem(tmp_path):
    data = yaml.safe_load(study_path("stages").read_text())
    bad = json.loads(json.dumps(data))
    bad["variants"][1]["full"]["skip_stages"] = ["stage9"]
    with pytest.raises(ValidationError, match="unknown stage 'stage9'"):
        Study.model_validate(bad)
    bad = json.loads(json.dumps(data))
    bad["variants"][1]["name"] = bad["variants"][0]["name"]
    with pytest.raises(ValidationError, match="variant names repeat"):
        Study.model_validate(bad)
    bad = json.loads(json.dumps(data))
    bad["variants"][0]["full"] = {"skip_stages": ["stage1", "stage2", "stage3"]}
    with pytest.raises(ValidationError, match="every stage is skipped"):
        Study.model_validate(bad)
    bad = json.loads(json.dumps(data))
    bad["smoke"]["stages"][0]["overrides"]["training.max_stepz"] = 3
    with pytest.raises(ValueError, match="max_stepz"):
        plan_study(Study.model_validate(bad), smoke=True, out=tmp_path, evaluation=EvaluationConfig())
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        build_metric("nope")
    with pytest.raises(FileNotFoundError, match="unknown study"):
        load_study("no-such-study")


def test_config_overrides_in_the_training_recipe():
    smoke = REPO / "experiments/configs/smoke.yaml"
    siglip = {"understanding_encoder": {"name": "siglip-tiny"}}
    config = load_config(smoke, overrides={"model.config_overrides": siglip}, check_files=False)
    assert config.model.harmon_config().understanding_encoder.name == "siglip-tiny"
    with pytest.raises(ValidationError, match="config_overrides"):
        load_config(smoke, overrides={"model.config_overrides": {"understanding_encoder": {"name": "no-such"}}},
                    check_files=False)
    with pytest.raises(ValidationError, match="only apply to a model.preset"):
        load_config(smoke, overrides={"model": {"pretrained": "x", "config_overrides": siglip}}, check_files=False)


def test_answer_matching_and_optional_fid(tmp_path):
    assert exact_match("On the left.", "on the left") and not exact_match("on the left side", "on the left")
    assert lenient_match("it is a red square", "a square") and not lenient_match("a circle", "a square")
    assert not lenient_match("", "red")
    with pytest.raises(MetricSkipped, match="no reference image set"):
        FID()(None)
    (tmp_path / "ref").mkdir()
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        with pytest.raises(MetricSkipped, match="torchmetrics is not installed"):
            FID(reference=str(tmp_path / "ref"))(None)
    assert {"diffusion_loss", "qa", "qa_loss", "fid"} <= set(METRICS)


# -------------------------------------------------------------------------------------------------- the runs
def test_unified_smoke_writes_every_artefact(runs):
    result = runs("unified")
    check_artefacts(result, ["gen/diffusion_loss", "und/ce", "und/accuracy", "und/exact_match"])
    rows = read_csv(result.out / "unified.csv")
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    assert all("train/text_to_image" in r for r in rows[1:])
    assert not summary(result)["skipped_metrics"]


def test_understanding_only_leaves_the_generation_head_untouched(runs):
    result = runs("unified")
    plans = {p.name: p for p in result.plans}
    info = {name: summary(result)["variants"][name]["stages"][0] for name in plans}
    assert info["und_only"]["tasks_run"] == ["image_to_text", "text"]
    assert info["gen_only"]["tasks_run"] == ["text_to_image"]
    assert "head" in info["und_only"]["trained"]  # trainable, yet it received no gradient:
    run = plans["und_only"].runs[0]
    before, after = initial_model(run), exported(run)
    for (name, a), b in zip(before.head.named_parameters(), after.head.parameters()):
        assert torch.equal(a, b), f"head.{name} changed in the understanding-only run"
    assert not all(torch.equal(a, b) for a, b in zip(before.llm.parameters(), after.llm.parameters()))
    unified = plans["unified"].runs[0]
    assert not all(torch.equal(a, b) for a, b in zip(initial_model(unified).head.parameters(),
                                                      exported(unified).head.parameters()))
    rows = read_csv(result.out / "und_only.csv")  # a head predicting as at init: the same held-out loss
    assert len({r["gen/diffusion_loss"] for r in rows}) == 1


def test_evaluation_does_not_change_the_training_run(runs, tmp_path):
    result = runs("unified")
    again = smoke_run("unified", tmp_path, variants=["unified"], eval_every=2)
    assert [int(r["step"]) for r in read_csv(tmp_path / "unified.csv")] == [0, 2, 4, 6]
    a = exported(result.plans[0].runs[0]).state_dict()
    b = exported(again.plans[0].runs[0]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decoupled_understanding_reads_its_own_encoder(runs):
    result = runs("shared_decoupled")
    check_artefacts(result, ["gen/diffusion_loss", "und/ce", "und/accuracy", "test/visual_norm"])
    plans = {p.name: p for p in result.plans}
    shared, decoupled = exported(plans["shared"].runs[0]), exported(plans["decoupled"].runs[0])
    assert shared.understanding_modules() == (shared.encoder, shared.proj_in)
    encoder, connector = decoupled.understanding_modules()
    assert type(encoder).__name__ == "SiglipEncoder" and encoder is not decoupled.encoder
    generation = {p.data_ptr() for p in [*decoupled.encoder.parameters(), *decoupled.proj_in.parameters()]}
    assert not generation & {p.data_ptr() for p in [*encoder.parameters(), *connector.parameters()]}
    before = initial_model(plans["decoupled"].runs[0])
    assert not all(torch.equal(a, b) for a, b in zip(before.understanding_encoder.parameters(),
                                                      encoder.parameters()))  # it trained
    assert "understanding_encoder" in summary(result)["variants"]["decoupled"]["stages"][0]["trained"]


def test_stages_smoke_skips_the_removed_stage(runs):
    result = runs("stages")
    check_artefacts(result, ["gen/diffusion_loss", "und/ce", "und/accuracy"])
    variants = summary(result)["variants"]
    assert [s["stage"] for s in variants["no_stage1"]["stages"]] == ["stage2", "stage3"]
    assert variants["no_stage1"]["skipped_stages"] == ["stage1"]
    assert variants["no_stage1"]["stages"][0]["model"] == {"preset": "tiny"}  # stage II from the initial model
    stage1_dirs = {s["output_dir"] for v in variants.values() for s in v["stages"] if s["stage"] == "stage1"}
    assert len(stage1_dirs) == 1  # trained once, shared by three variants
    assert not any(s["output_dir"] in stage1_dirs for s in variants["no_stage1"]["stages"])
    rows = read_csv(result.out / "no_stage1.csv")
    assert {r["stage"] for r in rows} == {"stage2", "stage3"} and rows[-1]["step"] == 2 * FEW_STEPS["stages"]
    assert "| II → III (no stage I) | – | ✓ | ✓ |" in (result.out / "table.md").read_text()
    for name in ("no_stage2", "no_stage3"):
        assert variants[name]["stages"][0]["output_dir"] in stage1_dirs


def test_resolution_smoke_trains_stage3_at_each_size(runs):
    result = runs("resolution")
    check_artefacts(result, ["gen/diffusion_loss", "und/ce"])
    for plan, size in zip(result.plans, (32, 48, 64)):
        rows = read_csv(result.out / f"{plan.name}.csv")
        assert {r["image_size"] for r in rows if r["stage"] == "stage3"} == {size}
        assert {r["image_size"] for r in rows if r["stage"] != "stage3"} == {32}
        assert plan.runs[-1].config.data.image_size == size
    assert len({s["output_dir"] for v in summary(result)["variants"].values() for s in v["stages"]}) == 5


def test_encoders_smoke_reports_understanding_per_encoder(runs):
    result = runs("encoders")
    check_artefacts(result, ["und/ce", "und/accuracy", "und/exact_match"])
    plans = {p.name: p for p in result.plans}
    vae, mar = exported(plans["vae"].runs[-1]), exported(plans["mar"].runs[-1])
    assert type(vae.understanding_encoder).__name__ == "KLFeatureEncoder" and mar.understanding_encoder is None
    for plan in result.plans:
        rows = read_csv(result.out / f"{plan.name}.csv")
        assert not any("gen/diffusion_loss" in r for r in rows)
        # the visual encoder is frozen in both stages; only the connector (then the LLM) trains
        encoder = "understanding_encoder" if plan.name == "vae" else "encoder"
        before, after = initial_model(plan.runs[0]), exported(plan.runs[-1])
        assert all(torch.equal(a, b) for a, b in zip(getattr(before, encoder).parameters(),
                                                     getattr(after, encoder).parameters()))
    # the other encoders of the study build from their smoke configuration
    for plan in plan_study(load_study("encoders"), smoke=True, out=result.out, evaluation=EvaluationConfig(),
                           variants=["siglip", "vqgan"]):
        model = HarmonModel.from_config(plan.runs[0].config.model.harmon_config())
        assert type(model.understanding_encoder).__name__ in ("SiglipEncoder", "VQGANEncoder")


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_main_lists_checks_reuses_and_rejects(runs, capsys):
    assert runner.main(["--list"]) == 0
    assert "Table 7" in capsys.readouterr().out
    result = runs("unified")
    args = ["--study", "unified", "--smoke", "--out", str(result.out), "--set", "training.max_steps=6",
            "--eval-every", "3"]
    markers = {p: p.stat().st_mtime_ns for p in (result.out / "runs").glob("*/ablation_run.json")}
    assert runner.main(args + ["--check"]) == 0
    assert runner.main(args) == 0  # every run finished before: reused, nothing trains
    out = capsys.readouterr().out
    assert out.count("reusing finished run") == 3
    assert markers == {p: p.stat().st_mtime_ns for p in markers}
    assert runner.main(["--study", "unified", "--smoke", "--out", str(result.out), "--variants", "nope"]) == 2
    assert runner.main(["--study", "unified", "--out", str(result.out), "--check"]) == 2  # full: no data here


def test_runs_as_a_script_path():
    done = subprocess.run([sys.executable, str(REPO / "experiments/ablations/run.py"), "--list"], cwd="/",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in STUDIES)


def test_smoke_runs_keep_only_the_export_model(runs):
    """A finished smoke stage run keeps export/harmon_model (and export_info.json); checkpoints and the export's
    pipeline copy are deleted, so a smoke study leaves megabytes, not gigabytes."""
    result = runs("unified")
    for plan in result.plans:
        for run in plan.runs:
            assert not (run.output_dir / "checkpoints").exists(), run.output_dir
            assert sorted(p.name for p in (run.output_dir / "export").iterdir()) == sorted(runner.SMOKE_KEEPS)
    total = sum(f.stat().st_size for f in (result.out / "runs").rglob("*") if f.is_file())
    per_run = total / len({run.key for plan in result.plans for run in plan.runs})
    assert per_run < 25 * 2**20, f"{per_run / 2**20:.1f} MiB per smoke run"  # the tiny model's weights: ~18 MiB
