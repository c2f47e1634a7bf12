"""Registry behaviour: creation, listing, errors, interface checks and entry-point plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

import harmon.configs  # noqa: F401  (registers the built-in families)
from harmon.interfaces import VisualEncoder
from harmon.registry import (
    BACKBONES,
    DECODERS,
    ENCODERS,
    HEADS,
    DuplicateComponentError,
    InterfaceError,
    Registry,
    UnknownComponentError,
)


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 8


class ToyEncoder(nn.Module):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.proj = nn.Linear(3, config.hidden_size)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.flatten(2).transpose(1, 2))


@pytest.fixture
def registry() -> Registry:
    return Registry("encoder", VisualEncoder)


def test_builtin_components_are_registered():
    assert {"mar", "mar-b", "mar-h", "mar-tiny"} <= set(ENCODERS.list())
    assert {"mar", "mar-b", "mar-h", "mar-tiny"} <= set(DECODERS.list())
    assert {"mlp-adaln", "mlp-adaln-b", "mlp-adaln-h", "mlp-adaln-tiny"} <= set(HEADS.list())
    assert {"qwen2", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2-tiny"} <= set(BACKBONES.list())


def test_create_applies_defaults_and_overrides(registry):
    registry.register("toy", hidden_size=4)(ToyEncoder)
    assert registry.create("toy").hidden_size == 4
    encoder = registry.create("toy", hidden_size=6)
    assert encoder.hidden_size == 6
    assert encoder.encode(torch.zeros(2, 3, 4, 4)).shape == (2, 16, 6)


def test_builtin_create_with_overrides():
    encoder = ENCODERS.create("mar-tiny", depth=1)
    assert len(encoder.blocks) == 1 and encoder.hidden_size == 64


def test_list_with_wildcard(registry):
    for name in ("toy-a", "toy-b", "other"):
        registry.register(name)(ToyEncoder)
    assert registry.list("toy-*") == ["toy-a", "toy-b"]
    assert registry.list() == ["other", "toy-a", "toy-b"]
    assert ENCODERS.list("mar-?") == ["mar-b", "mar-h"]


def test_unknown_name_lists_known_names_and_close_matches():
    with pytest.raises(UnknownComponentError) as info:
        ENCODERS.create("mar-bb")
    message = str(info.value)
    assert "'mar-bb'" in message and "Did you mean" in message and "'mar-b'" in message
    assert "mar-tiny" in message  # the known names are listed
    assert isinstance(info.value, KeyError)


def test_duplicate_name_needs_override(registry):
    registry.register("toy")(ToyEncoder)

    class OtherToy(ToyEncoder):
        pass

    with pytest.raises(DuplicateComponentError, match="'toy' is already registered"):
        registry.register("toy")(OtherToy)
    registry.register("toy", override=True)(OtherToy)
    assert registry.get("toy").component is OtherToy


def test_class_without_the_interface_is_refused_at_registration(registry):
    class NotAnEncoder(nn.Module):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__()

    with pytest.raises(InterfaceError, match="lacks encode"):
        registry.register("broken")(NotAnEncoder)
    assert "broken" not in registry


def test_instance_missing_an_attribute_is_refused_at_creation(registry):
    class NoHiddenSize(nn.Module):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__()

        def encode(self, pixels):
            return pixels

    registry.register("no-hidden")(NoHiddenSize)
    with pytest.raises(InterfaceError, match="missing hidden_size"):
        registry.create("no-hidden")


def test_bad_defaults_fail_at_registration_naming_the_field(registry):
    with pytest.raises(ValidationError, match="hidden_size"):
        registry.register("bad", hidden_size="many")(ToyEncoder)


def test_bad_override_names_the_field():
    with pytest.raises(ValidationError, match="num_heads"):
        ENCODERS.create("mar-tiny", num_heads=0)
    with pytest.raises(ValidationError, match="no_such_field"):
        ENCODERS.create("mar-tiny", no_such_field=1)


def test_registering_a_non_class_is_refused(registry):
    with pytest.raises(InterfaceError, match="must register a class"):
        registry.add("fn", lambda config: None)


PLUGIN_MODULE = textwrap.dedent(
    '''
    import torch
    from pydantic import BaseModel, ConfigDict
    from torch import nn

    from harmon.registry import ENCODERS


    class MeanColourConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        hidden_size: int = 3


    @ENCODERS.register("mean-colour")
    class MeanColourEncoder(nn.Module):
        config_class = MeanColourConfig

        def __init__(self, config):
            super().__init__()
            self.hidden_size = config.hidden_size

        def encode(self, pixels):
            return pixels.mean(dim=(2, 3))[:, None, :]
    '''
)


def test_entry_point_plugin_is_discovered_lazily(tmp_path):
    """A distribution in a temporary folder (module + dist-info with entry_points.txt) put on sys.path: a fresh
    process finds its encoder by name on first lookup, without importing it explicitly."""
    (tmp_path / "harmon_toy_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "harmon_toy_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: harmon-toy-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[harmon.plugins]\nmean-colour = harmon_toy_plugin\n")
    script = textwrap.dedent(
        """
        import sys, torch
        from harmon.registry import ENCODERS
        assert "harmon_toy_plugin" not in sys.modules
        encoder = ENCODERS.create("mean-colour")
        print(tuple(encoder.encode(torch.ones(2, 3, 4, 4)).shape), ENCODERS.list("mean-*"))
        """
    )
    env_path = f"{tmp_path}"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "(2, 1, 3) ['mean-colour']" in result.stdout


def test_broken_plugin_warns_and_the_rest_still_works(tmp_path):
    (tmp_path / "harmon_broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    dist_info = tmp_path / "harmon_broken_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: harmon-broken-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[harmon.plugins]\nbroken = harmon_broken_plugin\n")
    script = "from harmon.registry import ENCODERS; print(ENCODERS.list('mar-b'))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "['mar-b']" in result.stdout
    assert "harmon plugin 'broken'" in result.stderr and "boom" in result.stderr
