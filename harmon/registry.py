"""Component registries: one per role (encoders, decoders, backbones, heads).

A registry maps a *name* to a component class plus default config values (timm's "architecture + pretrained
config as data"). Components are built through the single door ``create(name, **overrides)``::

    @ENCODERS.register("my-encoder", hidden_size=256)
    class MyEncoder(nn.Module):
        config_class = MyEncoderConfig      # a pydantic model
        def __init__(self, config: MyEncoderConfig): ...

    enc = ENCODERS.create("my-encoder", hidden_size=512)
    enc = ENCODERS.create("my-encoder", pretrained="my-encoder.safetensors")  # built, then its weights loaded

Construction never reads a weight file: a config holds the architecture only. Pretrained weights are a separate,
explicit step after building (timm's build-then-load), :func:`load_pretrained`: the component's own
``load_pretrained(path)`` when it has one (a released format: a transformers folder, a taming or LDM checkpoint),
else a state dict (``.safetensors`` or a torch file) whose keys must match exactly. Errors name the file and the
keys.

``register`` checks at registration that the class provides the methods of the role's interface (a
``typing.Protocol``); ``create`` checks the built object against the protocol again (attributes such as
``hidden_size`` often exist only on instances). Third-party packages add components through the entry-point group
``harmon.plugins``: each entry point names a module (imported for its ``register`` decorators) or a callable
(called once with no arguments). Plugins are loaded lazily, once, on the first lookup in any registry.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel

PLUGIN_ENTRY_POINT_GROUP = "harmon.plugins"

T = TypeVar("T")


class UnknownComponentError(KeyError):
    """A name that no registry entry has; the message lists the known names and close matches."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(ValueError):
    """A name registered twice without ``override=True``."""


class InterfaceError(TypeError):
    """A component that does not provide what its role's interface requires."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    component: type
    defaults: dict[str, Any] = field(default_factory=dict)
    explicit_config_class: type[BaseModel] | None = None
    builder: Callable[[Any], Any] | None = None
    weights_loader: Callable[[Any, str], None] | None = None

    @property
    def config_class(self) -> type[BaseModel] | None:
        return self.explicit_config_class or getattr(self.component, "config_class", None)

    def build(self, **overrides: Any) -> Any:
        config = self.build_config(**overrides)
        factory = self.builder or self.component
        if config is None:
            return factory(**{**self.defaults, **overrides})
        return factory(config)

    def build_config(self, **overrides: Any) -> BaseModel | None:
        config_class = self.config_class
        if config_class is None:
            return None
        return config_class(**{**self.defaults, **overrides})


def protocol_members(protocol: type) -> tuple[set[str], set[str]]:
    """(method names, data-attribute names) a ``typing.Protocol`` declares, its bases included."""
    methods: set[str] = set()
    attributes: set[str] = set()
    for klass in reversed(protocol.__mro__):
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        for name in getattr(klass, "__annotations__", {}):
            if not name.startswith("_"):
                attributes.add(name)
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                attributes.add(name)
            elif callable(value):
                methods.add(name)
    if "forward" in methods:  # nn.Module subclasses expose __call__ through forward
        methods.add("__call__")
    return methods, attributes - methods


def _missing_members(obj: Any, names: set[str]) -> list[str]:
    return sorted(name for name in names if not hasattr(obj, name))


class Registry(Generic[T]):
    """Name → component class (+ default config values) for one role, with interface checks."""

    def __init__(self, role: str, interface: type | None = None) -> None:
        self.role = role
        self.interface = interface
        self._entries: dict[str, RegistryEntry] = {}

    # registration ---------------------------------------------------------------------------------------------
    def register(self, name: str, *, override: bool = False, **defaults: Any) -> Callable[[type], type]:
        """Class decorator: register ``cls`` under ``name`` with default config values ``defaults``."""

        def decorator(component: type) -> type:
            self.add(name, component, override=override, **defaults)
            return component

        return decorator

    def add(
        self,
        name: str,
        component: type,
        *,
        override: bool = False,
        config_class: type[BaseModel] | None = None,
        builder: Callable[[Any], Any] | None = None,
        weights_loader: Callable[[Any, str], None] | None = None,
        **defaults: Any,
    ) -> RegistryEntry:
        """Register ``component`` (the class of the built objects) under ``name``.

        ``config_class`` (default ``component.config_class``) validates ``defaults`` and overrides; ``builder``
        (default ``component``) turns a config into an instance, for classes whose constructor takes another
        config type (e.g. a transformers model); ``weights_loader(component, path)`` loads pretrained weights into
        a built one (default: the component's ``load_pretrained``, else a strict state dict; :func:`load_pretrained`),
        for classes that cannot carry the method (a transformers model loading its own folders).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.role} registry: a name must be a non-empty string, got {name!r}")
        if not inspect.isclass(component):
            raise InterfaceError(f"{self.role} registry: {name!r} must register a class, got {component!r}")
        existing = self._entries.get(name)
        same = existing is not None and (existing.component, existing.defaults, existing.explicit_config_class,
                                         existing.builder, existing.weights_loader) == (
            component, defaults, config_class, builder, weights_loader)
        if existing is not None and not override and not same:  # only an identical re-registration is a no-op
            what = "" if existing.component is not component else f" with defaults {existing.defaults}"
            raise DuplicateComponentError(
                f"{self.role} {name!r} is already registered to {existing.component.__qualname__}{what}; "
                "pass override=True to replace it"
            )
        if self.interface is not None:
            methods, _ = protocol_members(self.interface)
            missing = _missing_members(component, methods)
            if missing:
                raise InterfaceError(
                    f"{component.__qualname__} cannot be registered as {self.role} {name!r}: it lacks "
                    f"{', '.join(missing)} required by {self.interface.__name__}"
                )
        entry = RegistryEntry(name, component, dict(defaults), config_class, builder, weights_loader)
        if entry.config_class is not None and defaults:
            entry.build_config()  # bad defaults fail now, naming the field, not at first use
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._lookup(name)
        del self._entries[name]

    # lookup -----------------------------------------------------------------------------------------------------
    def _lookup(self, name: str) -> RegistryEntry:
        if not isinstance(name, str):
            raise TypeError(f"{self.role} name must be a string, got {type(name).__name__} {name!r}")
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownComponentError(
                f"unknown {self.role} {name!r}.{hint} Known {self.role}s: {', '.join(known) or '(none)'}"
            ) from None

    def get(self, name: str) -> RegistryEntry:
        return self._lookup(name)

    def create(self, name: str, *, pretrained: str | os.PathLike | None = None, **overrides: Any) -> T:
        """Build the component registered as ``name``; ``overrides`` replace its default config values. With
        ``pretrained``, its weights are then loaded from that file / folder (:func:`load_pretrained`, strict)."""
        obj = self._lookup(name).build(**overrides)
        self.check(obj, name)
        if pretrained is not None:
            self.load_pretrained(name, obj, pretrained)
        return obj

    def load_pretrained(self, name: str, component: Any, path: str | os.PathLike) -> Any:
        """Load ``path`` into ``component``, built as ``name``, with that entry's weights loader
        (:func:`load_pretrained`)."""
        return load_pretrained(component, path, self._lookup(name).weights_loader)

    def check(self, obj: Any, name: str = "") -> None:
        """Raise :class:`InterfaceError` when ``obj`` lacks a member of the role's interface."""
        if self.interface is None:
            return
        methods, attributes = protocol_members(self.interface)
        missing = _missing_members(obj, methods | attributes)
        if missing:
            label = f" {name!r}" if name else ""
            raise InterfaceError(
                f"{type(obj).__qualname__}{label} does not implement {self.interface.__name__}: "
                f"missing {', '.join(missing)}"
            )

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard ``pattern``."""
        if not isinstance(pattern, str):
            raise TypeError(f"{self.role} name pattern must be a string, got {type(pattern).__name__} {pattern!r}")
        load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self):
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.role!r}, {len(self._entries)} entries)"


def load_pretrained(
    component: Any, path: str | os.PathLike, loader: Callable[[Any, str], None] | None = None
) -> Any:
    """Load pretrained weights into a built ``component`` (in place; returned), strictly.

    ``loader(component, path)`` when given (a registry entry's ``weights_loader``), else
    ``component.load_pretrained(path)``, reads the component's own released format; otherwise ``path`` is a state
    dict file (``.safetensors``, or a torch checkpoint, unwrapped from ``model`` /
    ``state_dict``) whose keys must equal the component's. Missing, unexpected and mis-shaped keys raise
    :class:`~harmon.checkpoints.CheckpointKeyError` naming the file and the keys."""
    from harmon.checkpoints import CheckpointKeyError, load_state_dict_strict, read_state_dict

    source = os.fspath(path)
    try:
        method = getattr(component, "load_pretrained", None)
        if loader is not None:
            loader(component, source)
        elif callable(method):
            method(source)
        else:
            load_state_dict_strict(component, read_state_dict(source), source)
    except CheckpointKeyError as error:
        if source in str(error):
            raise
        raise CheckpointKeyError(f"{source}: {error}") from error
    return component


# plugins -------------------------------------------------------------------------------------------------------
# the families shipped with harmon register themselves when imported; they are imported on the first lookup
BUILTIN_FAMILIES = (
    "harmon.encoders.mar",
    "harmon.encoders.vae",
    "harmon.encoders.siglip",
    "harmon.encoders.vqgan",
    "harmon.decoders.mar",
    "harmon.heads.diffusion",
    "harmon.backbones.qwen",
)
_plugins_loaded = False


def load_plugins(force: bool = False) -> list[str]:
    """Import the built-in families and every ``harmon.plugins`` entry point, once; returns the entry-point
    names loaded by this call.

    A plugin that fails to import is reported with a warning naming it; the others still load.
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return []
    _plugins_loaded = True
    for module in BUILTIN_FAMILIES:
        importlib.import_module(module)
    loaded: list[str] = []
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        try:
            target = entry_point.load()
            if callable(target) and not inspect.ismodule(target):
                target()
            loaded.append(entry_point.name)
        except Exception as error:  # a broken plugin must not break the library
            warnings.warn(
                f"harmon plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error!r}",
                RuntimeWarning,
                stacklevel=2,
            )
    return loaded


def _make_registries() -> tuple[Registry, Registry, Registry, Registry]:
    from harmon import interfaces

    return (
        Registry("encoder", interfaces.VisualEncoder),
        Registry("decoder", interfaces.TokenDecoder),
        Registry("backbone", interfaces.LanguageBackbone),
        Registry("head", interfaces.DiffusionHead),
    )


ENCODERS, DECODERS, BACKBONES, HEADS = _make_registries()
