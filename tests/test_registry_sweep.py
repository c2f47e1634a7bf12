"""Every registered component name, as timm tests every registered model: build, interface check, forward, state-dict
round trip.

Full-size entries are built on the meta device (no memory, no time; shapes and keys only): the forward then checks
output shapes and the round trip the state dict's keys and shapes. The MAR stacks pick their tokens by value
(masked-token dropping), which meta tensors cannot do: their forward runs for real at full width with one block
(``depth=1``). The tiny entries are built for real: their forward runs on numbers and the round trip must
reproduce the forward exactly.
"""

from __future__ import annotations

import pytest
import torch

import harmon.configs  # noqa: F401  (registers every family)
from harmon.interfaces import DiffusionHead, GenerationEncoder, LanguageBackbone, TokenDecoder, UnderstandingEncoder
from harmon.registry import BACKBONES, DECODERS, ENCODERS, HEADS, protocol_members

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENTRIES = [(registry, name) for registry in (ENCODERS, DECODERS, HEADS, BACKBONES) for name in registry.list()]


def _is_tiny(name: str) -> bool:
    return name.endswith("-tiny")


def _build(registry, name, seed=0, meta=False):
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return registry.create(name).eval()
    return registry.create(name).eval()


def _interface(registry, component):
    if registry is ENCODERS:
        return UnderstandingEncoder if callable(getattr(component, "preprocess", None)) else GenerationEncoder
    return {DECODERS: TokenDecoder, HEADS: DiffusionHead, BACKBONES: LanguageBackbone}[registry]


def _forward(registry, component, device):
    """One forward of the role's contract; returns the output and checks its shape."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    if registry is ENCODERS and callable(getattr(component, "preprocess", None)):
        size = int(component.image_size)
        out = component.encode(component.preprocess(randn(1, 3, size, size).clamp(-1, 1)))
        assert out.shape[0] == 1 and out.shape[-1] == component.hidden_size
        return out
    if registry is ENCODERS:
        m = n = 2
        mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], device=device)
        out = component(randn(1, m * n, component.token_dim), mask, (m, n))
        assert tuple(out.shape) == (1, component.buffer_size + 2, component.embed_dim)
        return out
    if registry is DECODERS:
        m = n = 2
        mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], device=device)
        out = component(randn(1, component.buffer_size + 2, component.config.encoder_dim), mask, (m, n))
        assert tuple(out.shape) == (1, m * n, component.embed_dim)
        return out
    if registry is HEADS:
        config = component.config
        out = component(randn(3, config.token_dim), torch.tensor([0, 5, 999], device=device), randn(3, config.cond_dim))
        assert tuple(out.shape) == (3, 2 * config.token_dim)
        return out
    hidden = component.config.hidden_size
    out = component.get_decoder()(inputs_embeds=randn(1, 3, hidden)).last_hidden_state
    assert tuple(out.shape) == (1, 3, hidden)
    return out


@pytest.mark.parametrize("registry,name", ENTRIES, ids=[f"{r.role}:{n}" for r, n in ENTRIES])
def test_every_registered_component(registry, name):
    meta = not _is_tiny(name)
    device = torch.device("meta") if meta else torch.device("cpu")
    component = _build(registry, name, meta=meta)
    # interface: the registry's check and every member of the role's protocol
    registry.check(component, name)
    methods, attributes = protocol_members(_interface(registry, component))
    missing = sorted(member for member in methods | attributes if not hasattr(component, member))
    assert not missing, f"{name} lacks {missing}"
    with torch.no_grad():
        if meta and registry in (ENCODERS, DECODERS) and "depth" in type(component.config).model_fields:
            torch.manual_seed(0)
            _forward(registry, registry.create(name, depth=1).eval(), torch.device("cpu"))
            out = None
        else:
            out = _forward(registry, component, device)
        # state-dict round trip into a second instance (another seed): same keys and shapes; same numbers for tiny
        other = _build(registry, name, seed=1, meta=meta)
        other.load_state_dict(component.state_dict(), strict=True, assign=meta)
        if not meta:
            assert torch.equal(_forward(registry, other, device), out)


def _first_int_field(config) -> str | None:
    return next((name for name, value in config.model_dump().items()
                 if isinstance(value, int) and not isinstance(value, bool)), None)


@pytest.mark.parametrize("registry,name", ENTRIES, ids=[f"{r.role}:{n}" for r, n in ENTRIES])
def test_every_registered_config_is_strict_and_reads_its_own_json(registry, name):
    import json

    from pydantic import ValidationError

    entry = registry.get(name)
    config = entry.build_config()
    if config is None:
        pytest.skip(f"{name} has no config class")
    # its own JSON (tuples become lists) reads back to the same config
    assert type(config).model_validate(json.loads(config.model_dump_json())) == config
    field = _first_int_field(config)
    assert field is not None, f"{name}: no integer field to check"
    value = getattr(config, field)
    for bad in (str(value), float(value), True):  # "12" / 12.0 / True for a width: refused, not coerced
        with pytest.raises(ValidationError, match=field):
            entry.build_config(**{field: bad})
