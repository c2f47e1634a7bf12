"""Strict conversion of the original release files: every bad key is named."""

from __future__ import annotations

import shutil

import pytest
import torch

from harmon.checkpoints import CheckpointKeyError, read_state_dict
from harmon.conversion import convert_original_harmon_state_dict, load_original_harmon
from harmon.randomness import GeneratorRandomSource, ReplayRandomSource

from conftest import parity_files


def _load(parity_dir, harmon_checkpoint):
    files = parity_files(parity_dir)
    return load_original_harmon(harmon_checkpoint, files["vae"], files["llm"], original_config=files["config"])


@pytest.fixture
def original_state(fixture_files):
    return read_state_dict(fixture_files["harmon"])


def _save(tmp_path, state):
    path = tmp_path / "harmon_modified.pth"
    torch.save(state, path)
    return path


def test_every_original_key_is_converted_or_deliberately_ignored(original_state):
    converted, names = convert_original_harmon_state_dict(original_state)
    assert set(names.values()) | {"mar.class_emb.weight"} == set(original_state)
    assert "encoder.pos_embed" in converted and "head.net.time_embed.linear_1.weight" in converted


def test_missing_key_is_named(parity_dir, original_state, tmp_path):
    del original_state["mar.encoder_blocks.0.attn.qkv.weight"]
    with pytest.raises(CheckpointKeyError, match=r"missing keys: mar\.encoder_blocks\.0\.attn\.qkv\.weight"):
        _load(parity_dir, _save(tmp_path, original_state))


def test_unexpected_keys_are_named(parity_dir, original_state, tmp_path):
    original_state["mar.encoder_blocks.0.attn.extra"] = torch.zeros(1)
    original_state["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="something.else"):
        _load(parity_dir, _save(tmp_path, original_state))
    del original_state["something.else"]
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: mar\.encoder_blocks\.0\.attn\.extra"):
        _load(parity_dir, _save(tmp_path, original_state))


def test_misshaped_key_is_named_with_shapes(parity_dir, original_state, tmp_path):
    original_state["proj_in.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointKeyError, match=r"mis-shaped keys: proj_in\.0\.weight \(3, 3\)"):
        _load(parity_dir, _save(tmp_path, original_state))


def test_untied_lm_head_is_refused_when_the_config_ties_it(parity_dir, original_state, tmp_path):
    original_state["llm.lm_head.weight"] = original_state["llm.lm_head.weight"] + 1
    with pytest.raises(CheckpointKeyError, match="lm_head"):
        _load(parity_dir, _save(tmp_path, original_state))


def test_checkpoint_weights_win_over_the_llm_folder(fixture_files, parity_dir, original_state):
    model = _load(parity_dir, fixture_files["harmon"])
    assert torch.equal(model.llm.model.embed_tokens.weight, original_state["llm.model.embed_tokens.weight"])


def test_nonexistent_paths_are_named(fixture_files, parity_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _load(parity_dir, tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_original_harmon(fixture_files["harmon"], fixture_files["vae"], tmp_path, preset="tiny")


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_state_dict(path)


def test_pickled_code_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError, match="weights only"):
        read_state_dict(path)


def test_exactly_one_architecture_source(fixture_files):
    with pytest.raises(ValueError, match="exactly one"):
        load_original_harmon(fixture_files["harmon"], fixture_files["vae"], fixture_files["llm"])


def test_replay_source_refuses_a_wrong_shape_and_running_out():
    source = ReplayRandomSource(torch.arange(4)[None], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="recorded shape"):
        source.randn((3, 3), torch.device("cpu"), torch.float32)
    source.randn((2, 3), torch.device("cpu"), torch.float32)
    with pytest.raises(IndexError, match="exhausted"):
        source.randn((2, 3), torch.device("cpu"), torch.float32)


def test_generator_source_per_image_blocks_use_their_own_generator():
    def g(seed):
        return torch.Generator().manual_seed(seed)

    cpu = torch.device("cpu")
    both = GeneratorRandomSource([g(1), g(2)]).randn((4, 3), cpu, torch.float32, groups=2)
    first = GeneratorRandomSource([g(1)]).randn((2, 3), cpu, torch.float32, groups=1)
    second = GeneratorRandomSource([g(2)]).randn((2, 3), cpu, torch.float32, groups=1)
    assert torch.equal(both, torch.cat([first, second]))
    orders = GeneratorRandomSource([g(1), g(2)]).orders(2, 10, cpu)
    assert sorted(orders[0].tolist()) == list(range(10)) and not torch.equal(orders[0], orders[1])
    with pytest.raises(ValueError, match="empty list"):
        GeneratorRandomSource([])


def test_a_wrong_preset_is_one_short_message_with_the_sizes(fixture_files):
    """Issue 18: a wrong preset used to raise one 19.5 KB line listing 306 mis-shaped VAE tensors."""
    with pytest.raises(CheckpointKeyError) as caught:
        load_original_harmon(fixture_files["harmon"], fixture_files["vae"], fixture_files["llm"], preset="harmon-0.5b")
    message = str(caught.value)
    assert len(message) < 1000, len(message)
    assert "do not fit preset 'harmon-0.5b': encoder_embed_dim" in message and "(expected 768)" in message
    assert "pass the model's original config (--config" in message


def test_long_key_lists_are_summarised(fixture_files, original_state, tmp_path):
    for key in [k for k in original_state if k.startswith("mar.decoder_blocks.")]:
        del original_state[key]
    with pytest.raises(CheckpointKeyError, match=r"missing keys: mar\.decoder_blocks\.0\..*… \(\d+ more\)"):
        _load(fixture_files["harmon"].parent, _save(tmp_path, original_state))
