"""Condition probes (harmon.training.probes): the training-only region classifiers on the text→image conditions —
their pooling, loss and ignore rules, the recipe schema, the labels' path from annotation to batch, the training
module's loss, and that a run with them trains them and exports the model without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from harmon.testing import prompt_rows, tiny_model
from harmon.training.collator import IGNORE_INDEX
from harmon.training.config import ConditionProbeConfig, load_config
from harmon.training.modules import HarmonTrainingModule
from harmon.training.probes import ConditionProbes, region_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "configs" / "smoke.yaml"
HALVES = {"left": (0.0, 0.25, 0.5, 0.75), "right": (0.5, 0.25, 1.0, 0.75)}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- pooling
def test_region_weights_average_the_tokens_whose_centres_lie_in_each_box():
    weights = region_weights(HALVES, (8, 8))
    grid = weights.reshape(2, 8, 8)
    expected_left = torch.zeros(8, 8)
    expected_left[2:6, 0:4] = 1 / 16  # rows 2-5 (centres 0.3125 … 0.6875), columns 0-3
    assert torch.equal(grid[0], expected_left)
    assert torch.equal(grid[1], expected_left.roll(4, dims=1))
    # another grid (non-square): the same boxes, other tokens
    other = region_weights(HALVES, (4, 6)).reshape(2, 4, 6)
    assert torch.equal(other[0] > 0, torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                                    [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool))
    assert torch.allclose(other.sum((1, 2)), torch.ones(2))


def test_a_box_holding_no_token_centre_is_refused_by_name():
    with pytest.raises(ValueError, match=r"condition_probes.regions.sliver: .* holds no token centre of the 4×4"):
        region_weights({"sliver": (0.0, 0.0, 0.1, 1.0)}, (4, 4))


# ------------------------------------------------------------------------------------------------- the loss
def test_the_probe_loss_is_the_mean_cross_entropy_over_targets_on_the_labelled_entries():
    torch.manual_seed(0)
    probes = ConditionProbes(8, HALVES, {"digit": 11, "colour": 6})
    conditions = torch.randn(3, 64, 8)
    labels = torch.tensor([[[3, 0], [10, 5]],
                           [[IGNORE_INDEX, 2], [7, IGNORE_INDEX]],
                           [[IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]])
    loss, accuracy = probes(conditions, (8, 8), labels)
    pooled = torch.einsum("rl,bld->brd", region_weights(HALVES, (8, 8)), conditions)
    expected = []
    hits = count = 0
    for t, classifier in enumerate(probes.classifiers.values()):
        logits = classifier(pooled).reshape(-1, classifier.out_features)
        target = labels[:, :, t].reshape(-1)
        keep = target != IGNORE_INDEX
        expected.append(F.cross_entropy(logits[keep], target[keep]))
        hits += int((logits[keep].argmax(-1) == target[keep]).sum())
        count += int(keep.sum())
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-6, atol=1e-6)
    assert float(accuracy) == pytest.approx(hits / count)


def test_only_labelled_entries_carry_gradient_and_all_ignored_gives_zero():
    torch.manual_seed(0)
    probes = ConditionProbes(8, HALVES, {"digit": 11})
    conditions = torch.randn(2, 64, 8, requires_grad=True)
    labels = torch.tensor([[[3], [IGNORE_INDEX]], [[IGNORE_INDEX], [IGNORE_INDEX]]])
    loss, _ = probes(conditions, (8, 8), labels)
    loss.backward()
    grad = conditions.grad.reshape(2, 8, 8, 8).abs().sum(-1)
    assert grad[0, 2:6, 0:4].min() > 0  # the labelled region of the first row
    assert grad[0].sum() == grad[0, 2:6, 0:4].sum()  # and nothing else
    assert grad[1].sum() == 0
    conditions.grad = None
    probes.zero_grad(set_to_none=True)
    loss, accuracy = probes(conditions, (8, 8), torch.full((2, 2, 1), IGNORE_INDEX))
    assert float(loss.detach()) == 0.0 and float(accuracy) == 0.0
    loss.backward()  # still in the graph: every probe parameter gets a (zero) gradient
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in probes.parameters())


@pytest.mark.parametrize("labels, grid, message", [
    (torch.zeros(2, 2, 2, dtype=torch.long), (8, 8), r"region labels have shape \(2, 2, 2\), expected \(2, 2, 1\)"),
    (torch.zeros(2, 2, 1, dtype=torch.long), (4, 4), "conditions hold 64 tokens, the grid 4×4 has 16"),
])
def test_mismatched_labels_or_grid_are_refused(labels, grid, message):
    probes = ConditionProbes(8, HALVES, {"digit": 11})
    with pytest.raises(ValueError, match=message):
        probes(torch.zeros(2, 64, 8), grid, labels)


# ------------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("probes, message", [
    ({"weight": 0.5, "regions": {"l": [0.5, 0, 0.4, 1]}, "targets": {"d": 3}}, r"regions.l: .* is not a box"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1.5, 1]}, "targets": {"d": 3}}, r"regions.l: .* is not a box"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 1}}, "targets.d: 1 class"),
    ({"weight": 0.5, "regions": {}, "targets": {"d": 3}}, "regions and targets each need at least one entry"),
    ({"weight": 0, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}}, "weight"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}, "typo": 1}, "typo"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}, "conditions": {"c": "prompt_only"}},
     r"conditions: \['c'\] name no target"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}, "conditions": {"d": "first_step"}},
     "conditions"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}, "first_step_diffusion": -1},
     "first_step_diffusion"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}, "region_masking": 1.5},
     "region_masking"),
    ({"weight": 0.5, "regions": {"l": [0, 0, 1, 1]}, "targets": {"d": 3}, "region_masking": -0.1},
     "region_masking"),
])
def test_bad_probe_settings_are_refused_naming_the_field(probes, message):
    with pytest.raises(ValidationError, match=message):
        ConditionProbeConfig(**probes)


def test_probes_without_text_to_image_data_are_refused(tmp_path):
    probes = json.dumps({"weight": 0.5, "regions": HALVES, "targets": {"digit": 11}})
    with pytest.raises(ValueError, match="condition_probes: they read text→image batches, but data.ratios.text_to_image is 0"):
        load_config(SMOKE, overrides=[f"condition_probes={probes}", "data.ratios.text_to_image=0",
                                      f"output_dir={tmp_path}"], check_files=False)


# ------------------------------------------------------------------------------------------------- data → batch
def caption_folder(tmp_path: Path, annotations: list[dict]) -> Path:
    from PIL import Image

    (tmp_path / "images").mkdir()
    info = []
    for i, annotation in enumerate(annotations):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / f"{i}.json").write_text(json.dumps(annotation))
        info.append({"image": f"images/{i}.png", "annotation": f"{i}.json"})
    (tmp_path / "data_info.json").write_text(json.dumps(info))
    return tmp_path


def probe_dataset(root: Path):
    from harmon.training.config import DataConfig
    from harmon.training.data import MultiTaskDataset

    data = DataConfig(root=root, image_size=64, num_workers=0, ratios={"text_to_image": 1},
                      text_to_image=[{"format": "caption", "data_info": "data_info.json"}])
    probes = ConditionProbeConfig(weight=0.5, regions=HALVES, targets={"digit": 11, "colour": 6})
    return MultiTaskDataset(data, probes)


def test_region_labels_travel_from_the_annotation_to_the_batch_and_a_dropped_caption_loses_them(tmp_path):
    from harmon.testing import tiny_tokenizer
    from harmon.configs import PromptTemplate
    from harmon.training.collator import HarmonCollator

    root = caption_folder(tmp_path, [
        {"caption": "a red 3 on the left", "region_labels": {"left": {"digit": 3, "colour": 0},
                                                              "right": {"digit": 10, "colour": 5}}},
        {"caption": "a blue 7 on the right", "region_labels": {"right": {"digit": 7}}},
    ])
    dataset = probe_dataset(root)
    first, second = dataset[("text_to_image", 0, 0)], dataset[("text_to_image", 1, 0)]
    assert first["region_labels"].tolist() == [[3, 0], [10, 5]]
    assert second["region_labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX], [7, IGNORE_INDEX]]
    collator = HarmonCollator(tiny_tokenizer(), image_token_id=3, image_tokens=24, prompt_template=PromptTemplate(),
                              generation_prefix="Generate an image: ", unconditional_prompt="Generate an image.",
                              cfg_drop_prob=0.5, seed=0)
    draws = range(40)
    dropped = [d for d in draws if collator.caption_dropped(d)]
    kept = [d for d in draws if not collator.caption_dropped(d)]
    batch = collator([{**first, "draw": dropped[0]}, {**first, "draw": kept[0]}])
    assert batch["captions"][0] == "" and batch["captions"][1] == "a red 3 on the left"
    assert batch["region_labels"].tolist() == [[[IGNORE_INDEX] * 2] * 2, [[3, 0], [10, 5]]]


@pytest.mark.parametrize("labels, message", [
    ({"left": {"digit": 11}}, r"region_labels.left.digit is 11, not a class in \[0, 11\)"),
    ({"left": {"digit": "3"}}, r"region_labels.left.digit is '3', not a class"),
    ({"middle": {"digit": 3}}, r"names regions \['middle'\] that condition_probes.regions does not define"),
    ([1, 2], "'region_labels' must map regions"),
])
def test_bad_region_labels_are_refused_naming_the_file_and_key(tmp_path, labels, message):
    root = caption_folder(tmp_path, [{"caption": "a red 3 on the left", "region_labels": labels}])
    with pytest.raises(ValueError, match=message) as error:
        probe_dataset(root)[("text_to_image", 0, 0)]
    assert "0.json" in str(error.value)


# ------------------------------------------------------------------------------------------------- the module
def test_the_module_adds_the_weighted_probe_loss_to_the_unchanged_diffusion_loss():
    model = tiny_model(seed=0)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ids, attention = prompt_rows([[5, 6, 7, 8], [9, 10, 11]], None)
    batch = {"task": "text_to_image", "pixels": pixels, "input_ids": ids, "attention_mask": attention,
             "region_labels": torch.tensor([[[1], [0]], [[0], [2]]])}
    config = ConditionProbeConfig(weight=0.25, regions=HALVES, targets={"shape": 3})
    plain = HarmonTrainingModule(model, 3)(batch, generator=seeded(5))
    probed = HarmonTrainingModule(model, 3, config)
    total = probed(batch, generator=seeded(5))
    probe_loss = float(probed.last_probe_metrics["probes/loss"])
    assert probe_loss > 0
    # the same mask, timesteps and noise as without probes: the difference is the weighted probe loss alone
    assert float(total.detach()) == pytest.approx(float(plain.detach()) + 0.25 * probe_loss, rel=1e-6)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probed.probes.parameters())
    assert not any(name.startswith("probes") for name, _ in model.named_parameters())


def test_a_run_with_probes_trains_them_logs_them_and_exports_the_model_without_them(tmp_path):
    from conftest import reset_accelerate_state

    from harmon.model import HarmonModel
    from harmon.training.synthetic import write_shapes_dataset
    from harmon.training.trainer import Trainer

    shapes = write_shapes_dataset(tmp_path / "shapes", count=8, size=64, seed=0)
    for path in sorted(shapes.glob("**/*.json")):  # give every caption annotation a label (its index parity)
        annotation = json.loads(path.read_text())
        if isinstance(annotation, dict) and "caption" in annotation:
            annotation["region_labels"] = {"left": {"parity": len(annotation["caption"]) % 2}}
            path.write_text(json.dumps(annotation))
    probes = json.dumps({"weight": 0.5, "regions": HALVES, "targets": {"parity": 2}})
    reset_accelerate_state()
    config = load_config(SMOKE, overrides=[
        f"data.root={shapes}", f"output_dir={tmp_path / 'run'}", "training.max_steps=3", "training.log_every=1",
        "data.ratios={text: 0, image_to_text: 0, text_to_image: 1}", f"condition_probes={probes}",
        "training.checkpoint_every=100",
    ])
    trainer = Trainer(config)
    module = trainer.accelerator.unwrap_model(trainer.module)
    before = {k: v.clone() for k, v in module.probes.state_dict().items()}
    result = trainer.train()
    after = module.probes.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the probes did not train"
    assert "condition_probes" in trainer.learning_rates()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["probes/accuracy"] <= 1 and m["probes/loss"] > 0 for m in metrics)
    exported = HarmonModel.from_pretrained(result.export_dir / "harmon_model")  # strict: no probe keys
    assert not any("probe" in key for key in exported.state_dict())
    reset_accelerate_state()


def unlabelled_text_to_image_batch():
    """A tiny model and a two-image text→image batch with every region label ignored (no probe loss)."""
    model = tiny_model(seed=0)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ids, attention = prompt_rows([[5, 6, 7, 8], [9, 10, 11]], None)
    batch = {"task": "text_to_image", "pixels": pixels, "input_ids": ids, "attention_mask": attention,
             "region_labels": torch.full((2, 2, 1), IGNORE_INDEX)}
    return model, pixels, ids, attention, batch


def test_first_step_diffusion_adds_the_weighted_diffusion_loss_of_the_prompt_only_conditions():
    """``first_step_diffusion = w``: the loss gains ``w`` × the diffusion loss with every token masked, on the
    conditions the prompts alone give (recomputed here by hand with the generator's draws in the module's order)."""
    # no probe loss: the difference is the new term
    model, pixels, ids, attention, batch = unlabelled_text_to_image_batch()
    config = ConditionProbeConfig(weight=0.25, regions=HALVES, targets={"shape": 3}, first_step_diffusion=0.5)
    with torch.no_grad():
        total = HarmonTrainingModule(model, 3, config)(batch, generator=seeded(5))
        generator = seeded(5)
        tokens = model.encode_image(pixels)
        b, m, n, _ = tokens.shape
        mask = model.random_training_mask(b, m * n, generator)
        plain = model.diffusion_loss(tokens, model.text_to_image_conditions(tokens, ids, attention, mask), mask,
                                     generator)
        everything = torch.ones_like(mask)
        first = model.diffusion_loss(tokens, model.text_to_image_conditions(tokens, ids, attention, everything),
                                     everything, generator)
    assert float(first) > 0 and float(total) == pytest.approx(float(plain) + 0.5 * float(first), rel=1e-6)
    assert float(total) != pytest.approx(float(plain), rel=1e-3)

def probe_metrics_on_two_images(module, ids, attention, labels) -> list[dict]:
    """The module's probe metrics on the same prompts, labels, mask and noise under two different images."""
    out = []
    for image_seed in (0, 1):
        pixels = torch.rand(2, 3, 64, 64, generator=seeded(image_seed)) * 2 - 1
        batch = {"task": "text_to_image", "pixels": pixels, "input_ids": ids, "attention_mask": attention,
                 "region_labels": labels}
        with torch.no_grad():
            module(batch, generator=seeded(5))
        out.append(dict(module.last_probe_metrics))
    return out


@pytest.mark.parametrize("conditions", ["prompt_only", "training"])
def test_prompt_only_probes_read_the_prompt_alone_and_training_probes_the_visible_tokens(conditions):
    """``prompt_only`` probes read MAR's first-step conditions (every token masked): another image under the same
    prompts and mask leaves their loss unchanged. ``training`` probes read the training mask's conditions, which
    see the visible tokens: there another image changes it."""
    model = tiny_model(seed=0)
    ids, attention = prompt_rows([[5, 6, 7, 8], [9, 10, 11]], None)
    labels = torch.tensor([[[1], [0]], [[0], [2]]])
    config = ConditionProbeConfig(weight=0.25, regions=HALVES, targets={"shape": 3}, conditions=conditions)
    module = HarmonTrainingModule(model, 3, config)
    losses = [float(m["probes/loss"]) for m in probe_metrics_on_two_images(module, ids, attention, labels)]
    if conditions == "prompt_only":
        assert losses[0] == losses[1]
    else:
        assert abs(losses[0] - losses[1]) > 1e-6


@pytest.mark.parametrize("read", ["prompt_only", "training"])
def test_each_target_reads_its_own_conditions(read):
    """``conditions`` per target: ``shape`` reads the prompt-only conditions, ``tint`` the training mask's. With only
    the target under test labelled, another image leaves the loss unchanged for the prompt-only one and changes it
    for the training one (a module feeding both probes the same conditions fails one of the two cases)."""
    model = tiny_model(seed=0)
    ids, attention = prompt_rows([[5, 6, 7, 8], [9, 10, 11]], None)
    config = ConditionProbeConfig(weight=0.25, regions=HALVES, targets={"shape": 3, "tint": 4},
                                  conditions={"shape": "prompt_only"})
    assert (config.source_of("shape"), config.source_of("tint")) == ("prompt_only", "training")
    module = HarmonTrainingModule(model, 3, config)
    labels = torch.full((2, 2, 2), IGNORE_INDEX)
    labelled = 0 if read == "prompt_only" else 1
    labels[:, :, labelled] = torch.tensor([[1, 0], [0, 2]])
    losses = []
    for metrics in probe_metrics_on_two_images(module, ids, attention, labels):
        losses.append(float(metrics["probes/loss"]))
        unlabelled = "probes/accuracy/" + ("tint" if read == "prompt_only" else "shape")
        assert torch.isnan(metrics[unlabelled]) and 0 <= float(metrics["probes/accuracy"]) <= 1
    if read == "prompt_only":
        assert losses[0] == losses[1]
    else:
        assert abs(losses[0] - losses[1]) > 1e-6


# ------------------------------------------------------------------------------------------------ region masking
GRID = (8, 8)  # HALVES on an 8×8 grid: rows 2-5, columns 0-3 (left) and 4-7 (right), 16 tokens each


def region_members() -> torch.Tensor:
    return region_weights(HALVES, GRID) > 0


def training_like_mask(rows: int, masked: int, seed: int) -> torch.Tensor:
    generator = seeded(seed)
    orders = torch.stack([torch.randperm(64, generator=generator) for _ in range(rows)])
    return torch.zeros(rows, 64).scatter_(1, orders[:, :masked], 1.0)


@pytest.mark.parametrize("masked", [45, 50, 63])
def test_region_masking_masks_one_whole_region_per_row_and_keeps_each_rows_count(masked):
    """Probability 1: every row has one region masked whole; each row keeps its number of masked tokens (the MAR
    encoder needs it); the tokens visible outside that region stay visible (only the region's visible tokens move);
    both regions are chosen over the rows."""
    probes = ConditionProbes(8, HALVES, {"digit": 3})
    mask = training_like_mask(32, masked, seed=1)
    out = probes.mask_regions(mask, GRID, 1.0, seeded(2))
    members = region_members()
    assert torch.equal(out.sum(1), mask.sum(1))
    whole = (out[:, None, :].bool() | ~members[None]).all(-1)  # (rows, regions): region masked whole
    assert bool(whole.any(1).all()) and bool(whole[:, 0].any()) and bool(whole[:, 1].any())
    for row in range(32):
        masked_whole = members[whole[row]].any(0)  # the chosen region (both, when the other is masked already)
        still_visible = (mask[row] == 0) & ~masked_whole
        assert bool((out[row][still_visible] == 0).all())
    assert not torch.equal(out, mask)


def test_region_masking_with_fewer_masked_tokens_than_the_region_masks_only_inside_it():
    probes = ConditionProbes(8, HALVES, {"digit": 3})
    mask = training_like_mask(8, 10, seed=3)  # 10 masked < the 16 tokens of a region
    out = probes.mask_regions(mask, GRID, 1.0, seeded(4))
    members = region_members()
    assert torch.equal(out.sum(1), mask.sum(1))
    inside = [(out[row].bool() & ~members[r]).sum() == 0 for row in range(8) for r in range(2)]
    assert sum(bool(x) for x in inside) == 8  # each row: all 10 masked tokens lie in one region


def test_region_masking_probability_zero_changes_nothing_and_draws_the_same_numbers():
    """Probability 0 returns the mask unchanged; a share of the rows follows the probability; the generator
    advances by the same draws whatever the probability (what comes after it does not depend on it)."""
    probes = ConditionProbes(8, HALVES, {"digit": 3})
    mask = training_like_mask(400, 50, seed=5)
    after = []
    for probability in (0.0, 0.3, 1.0):
        generator = seeded(6)
        out = probes.mask_regions(mask, GRID, probability, generator)
        changed = (out != mask).any(1).float().mean()
        if probability == 0.0:
            assert torch.equal(out, mask)
        elif probability == 0.3:
            assert 0.2 < float(changed) < 0.4
        after.append(torch.rand(3, generator=generator))
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])


@pytest.mark.parametrize("probability, mask, message", [
    (1.5, torch.ones(2, 64), r"the probability must be in \[0, 1\], got 1.5"),
    (0.5, torch.ones(2, 63), r"the mask has shape \(2, 63\), expected \(batch, 64\) for the 8×8 grid"),
    (0.5, torch.ones(64), r"the mask has shape \(64,\)"),
])
def test_bad_region_masking_input_is_refused(probability, mask, message):
    with pytest.raises(ValueError, match=message):
        ConditionProbes(8, HALVES, {"digit": 3}).mask_regions(mask, GRID, probability)


def test_the_module_trains_on_the_region_masked_mask():
    """``region_masking`` = 1: the module's loss is the diffusion loss (and the probes) under the training mask
    with one region masked whole, recomputed here by hand with the generator's draws in the module's order."""
    model, pixels, ids, attention, batch = unlabelled_text_to_image_batch()  # no probe loss: the diffusion loss alone
    config = ConditionProbeConfig(weight=0.25, regions=HALVES, targets={"shape": 3}, region_masking=1.0)
    with torch.no_grad():
        module = HarmonTrainingModule(model, 3, config)
        total = module(batch, generator=seeded(5))
        plain = HarmonTrainingModule(model, 3, config.model_copy(update={"region_masking": 0.0}))(
            batch, generator=seeded(5))
        generator = seeded(5)
        tokens = model.encode_image(pixels)
        b, m, n, _ = tokens.shape
        mask = module.probes.mask_regions(model.random_training_mask(b, m * n, generator), (m, n), 1.0, generator)
        by_hand = model.diffusion_loss(tokens, model.text_to_image_conditions(tokens, ids, attention, mask), mask,
                                       generator)
    assert float(total) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(total) != pytest.approx(float(plain), rel=1e-4)
