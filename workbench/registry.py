"""The plugin registry: entry-point discovery, validation, allow/block lists and listings.

Plugins are loaded from the entry-point group ``workbench.plugins`` one at a time, so a plugin that
fails to import, implements a hook that does not exist, raises inside a hook or registers something
invalid is reported with its package name and skipped while everything else keeps working.

Environment:
- ``WORKBENCH_PLUGINS=a,b`` loads only the named plugins (entry-point or distribution names);
- ``WORKBENCH_DISABLE_PLUGINS=x,y`` blocks the named ones.
"""

from __future__ import annotations

import difflib
import importlib.metadata as metadata
import inspect
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
from pydantic import ValidationError

from workbench import hookspecs
from workbench._version import API_VERSION
from workbench.checkpoint.base import CheckpointFormat, CheckpointReader
from workbench.errors import CheckpointError, PluginError, RecipeError
from workbench.evaluator import Evaluator, EvaluatorOptions
from workbench.executor import Executor
from workbench.method import MODES, MergeMethod, MethodParameters

ENTRY_POINT_GROUP = "workbench.plugins"
#: The distribution of the built-in plugins: they are loaded first, so a name they register is kept.
CORE_DISTRIBUTION = "merge-workbench"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_API = re.compile(r"^(\d+)\.(\d+)$")


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    package: str  # distribution that provides it
    version: str


@dataclass
class Registered:
    obj: Any
    plugin: PluginInfo


@dataclass
class Registry:
    """Everything the loaded plugins registered, with where each item came from."""

    methods: dict[str, Registered] = field(default_factory=dict)
    formats: dict[str, Registered] = field(default_factory=dict)
    executors: dict[str, Registered] = field(default_factory=dict)
    evaluators: dict[str, Registered] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    #: One message per plugin problem; the plugin (or the offending item) was skipped.
    problems: list[str] = field(default_factory=list)

    # -- lookups ---------------------------------------------------------------------------------
    def method(self, name: str) -> type[MergeMethod]:
        return self._lookup(self.methods, name, "method").obj

    def executor(self, name: str) -> type[Executor]:
        return self._lookup(self.executors, name, "executor").obj

    def evaluator(self, name: str) -> type[Evaluator]:
        return self._lookup(self.evaluators, name, "evaluator").obj

    def make_evaluator(self, name: str, options: dict[str, Any]) -> Evaluator:
        """An evaluator with validated options; an error names the evaluator and the option."""
        cls = self.evaluator(name)
        try:
            validated = cls.Options.model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()
            )
            raise RecipeError(f"evaluator '{name}': invalid options ({problems}).") from None
        return cls(validated)

    def format(self, name: str) -> CheckpointFormat:
        return self._lookup(self.formats, name, "format").obj

    @staticmethod
    def _lookup(table: dict[str, Registered], name: str, kind: str) -> Registered:
        if name in table:
            return table[name]
        close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        known = ", ".join(sorted(table)) or "none (no plugin registered one)"
        raise RecipeError(f"unknown {kind} '{name}'.{hint} Known {kind}s: {known}.")

    def open_checkpoint(self, path: str | Path) -> CheckpointReader:
        """Open a checkpoint with the first format that recognises it."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"model path {path} does not exist.")
        for entry in self.formats.values():
            if entry.obj.detect(path):
                return entry.obj.open(path)
        known = ", ".join(f"{n} ({e.obj.description})" for n, e in self.formats.items()) or "none"
        raise CheckpointError(f"{path} is not a model folder that any format recognises. Formats: {known}.")


def _split_env(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


def _dist_info(ep: metadata.EntryPoint, parsed: dict[int, tuple[str, str]]) -> PluginInfo:
    """Where an entry point comes from. ``Distribution.name`` and ``.version`` parse the METADATA
    file on every access, so each distribution's are read once into ``parsed`` (keyed by the
    distribution object, which every entry point of one distribution shares)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return PluginInfo(name=ep.name, package=ep.module.split(".")[0], version="?")
    if id(dist) not in parsed:
        fields = dist.metadata
        parsed[id(dist)] = (fields["Name"], fields["Version"])
    package, version = parsed[id(dist)]
    return PluginInfo(name=ep.name, package=package, version=version)


class _Loader:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.pm = pluggy.PluginManager("workbench")
        self.pm.add_hookspecs(hookspecs)

    def load_entry_points(self, only: set[str], blocked: set[str]) -> None:
        seen: set[tuple[str, str]] = set()
        parsed: dict[int, tuple[str, str]] = {}
        found = [(ep, _dist_info(ep, parsed)) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]

        # Built-in plugins first, then the others by package and name: when two plugins register the
        # same name the first one keeps it, whatever the order of sys.path or of a folder listing.
        def order(item: tuple[metadata.EntryPoint, PluginInfo]) -> tuple[bool, str, str]:
            package = re.sub(r"[-_.]+", "-", item[1].package).lower()
            return (package != CORE_DISTRIBUTION, package, item[0].name)

        for ep, info in sorted(found, key=order):
            if (info.package, ep.name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((info.package, ep.name))
            if only and not ({ep.name, info.package} & only):
                continue
            if {ep.name, info.package} & blocked:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                self.problem(info, f"failed to import ({type(exc).__name__}: {exc})")
                continue
            self.add(plugin, info)

    def add(self, plugin: Any, info: PluginInfo) -> None:
        refusal = api_refusal(getattr(plugin, "WORKBENCH_API", None))
        if refusal:
            self.problem(info, refusal)
            return
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:
            self.problem(info, f"could not be registered ({exc})")
            return
        unknown = [
            impl.function.__name__
            for caller in (self.pm.get_hookcallers(plugin) or [])
            if not caller.has_spec()
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin
        ]
        if unknown:
            self.pm.unregister(plugin)
            self.problem(info, f"implements unknown hook(s) {', '.join(sorted(unknown))}")
            return
        self.registry.plugins.append(info)

    def check_registered(self, table: dict[str, Registered], kind: str, check: Callable[[Any], None]) -> None:
        """A check that needs every item registered first: an item that fails it is dropped."""
        for name, entry in list(table.items()):
            try:
                check(entry.obj)
            except Exception as exc:
                del table[name]
                self.problem(entry.plugin, f"registered an invalid {kind}: {exc}")

    def problem(self, info: PluginInfo, message: str) -> None:
        self.registry.problems.append(f"plugin '{info.name}' (package {info.package}) {message}; skipped.")

    def call(self, hook_name: str, table: dict[str, Registered], check: Callable[[Any], str]) -> None:
        """Call one hook plugin by plugin, in load order, so every item records which plugin
        supplied it and the first plugin to register a name keeps it. The order is the registry's,
        not pluggy's: ``tryfirst``/``trylast`` on a hookimpl must not let a plugin take a name
        from one loaded before it."""
        infos = {p.name: p for p in self.registry.plugins}
        order = {p.name: i for i, p in enumerate(self.registry.plugins)}
        impls = sorted(
            getattr(self.pm.hook, hook_name).get_hookimpls(),
            key=lambda impl: order.get(impl.plugin_name, len(order)),
        )
        for impl in impls:
            info = infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name, impl.plugin_name, "?")
            if impl.hookwrapper or impl.wrapper:
                self.problem(
                    info, f"marks {hook_name} as a hook wrapper, which registration hooks do not support"
                )
                continue

            def register(obj: Any, _info: PluginInfo = info) -> None:
                try:
                    name = check(obj)
                except Exception as exc:  # a check failing on a strange object is still that object's fault
                    self.problem(
                        _info, f"registered an invalid {hook_name.removeprefix('register_')[:-1]}: {exc}"
                    )
                    return
                if name in table:
                    other = table[name].plugin
                    self.problem(
                        _info,
                        f"registered '{name}', which plugin '{other.name}' (package {other.package}) already provides",
                    )
                    return
                table[name] = Registered(obj, _info)

            try:
                impl.function(register=register)
            except Exception as exc:
                self.problem(info, f"raised in {hook_name} ({type(exc).__name__}: {exc})")


def api_refusal(required: Any) -> str | None:
    """Why a plugin that declares ``WORKBENCH_API = required`` cannot load here, or None if it can.

    The plugin API is versioned MAJOR.MINOR (:data:`workbench.API_VERSION`): a minor release only
    adds, so a plugin built for 1.0 loads into any 1.x from 1.0 up; a major release breaks, so a
    plugin built for another major version is refused. A plugin that declares nothing is loaded.
    """
    if required is None:
        return None
    match = _API.match(required) if isinstance(required, str) else None
    if match is None:
        return f"declares WORKBENCH_API = {required!r}, which is not a 'MAJOR.MINOR' version string"
    major, minor = int(match[1]), int(match[2])
    have_major, have_minor = (int(part) for part in API_VERSION.split("."))
    if major != have_major or minor > have_minor:
        return (
            f"was built for workbench plugin API {required}, but this workbench provides plugin API "
            f"{API_VERSION} (compatible: {have_major}.0 to {API_VERSION}); install a version of the plugin "
            f"built for API {have_major}.x"
        )
    return None


def _check_name(obj: Any, kind: str) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} {obj!r} needs a lowercase identifier 'name', got {name!r}")
    return name


def check_method(obj: Any) -> str:
    if not (inspect.isclass(obj) and issubclass(obj, MergeMethod)):
        raise TypeError(f"{obj!r} is not a MergeMethod subclass")
    name = _check_name(obj, "method")
    if not isinstance(getattr(obj, "summary", None), str) or not obj.summary.strip():
        raise ValueError(f"method '{name}' has no summary")
    for attr in ("Parameters", "ModelParameters"):
        schema = getattr(obj, attr)
        if not (inspect.isclass(schema) and issubclass(schema, MethodParameters)):
            raise ValueError(f"method '{name}': {attr} must subclass workbench.method.MethodParameters")
        clash = (
            set(obj.Parameters.model_fields) & set(obj.ModelParameters.model_fields)
            if attr == "ModelParameters"
            else set()
        )
        if clash:
            raise ValueError(f"method '{name}': parameter(s) {sorted(clash)} are both global and per-model")
        for fname, finfo in schema.model_fields.items():
            if not finfo.description:
                raise ValueError(f"method '{name}': parameter '{fname}' has no description")
    if obj.base_model not in ("required", "optional", "unused"):
        raise ValueError(f"method '{name}': base_model must be 'required', 'optional' or 'unused'")
    if obj.apply is MergeMethod.apply:
        raise ValueError(f"method '{name}' does not implement apply()")
    if obj.mode not in MODES:
        raise ValueError(f"method '{name}': mode must be one of {', '.join(MODES)}, not {obj.mode!r}")
    if obj.mode == "blockwise" and obj.tensor_statistics is MergeMethod.tensor_statistics:
        raise ValueError(f"method '{name}' is blockwise but does not implement tensor_statistics()")
    return name


def check_defaults(method: type[MergeMethod]) -> None:
    """A recipe that leaves a parameter out gets its default, and pydantic does not check defaults:
    a default its own constraints refuse would fail every such recipe, so it is refused here. Each
    default is checked alone (cross-field validators see only the fields a recipe sets).

    Run once every method is registered: a validator may look up another method (LiNeS checks the
    method it wraps), and :func:`get_registry` then answers with the registry being built."""
    for attr in ("Parameters", "ModelParameters"):
        _check_schema(getattr(method, attr), f"method '{method.name}': {attr}")


def _check_schema(schema: type[MethodParameters], where: str) -> None:
    for field_name, info in schema.model_fields.items():
        if info.is_required():
            continue
        key = info.alias or field_name
        try:
            schema.model_validate({key: info.get_default(call_default_factory=True)})
        except ValidationError as exc:
            for error in exc.errors():
                if error["loc"][:1] == (key,):
                    raise ValueError(f"{where}: the default of '{key}' is invalid ({error['msg']})") from None


def check_format(obj: Any) -> str:
    if not isinstance(obj, CheckpointFormat):
        raise TypeError(f"{obj!r} is not a CheckpointFormat instance")
    return _check_name(obj, "format")


def check_executor(obj: Any) -> str:
    if not (inspect.isclass(obj) and issubclass(obj, Executor)):
        raise TypeError(f"{obj!r} is not an Executor subclass")
    return _check_name(obj, "executor")


def check_evaluator(obj: Any) -> str:
    if not (inspect.isclass(obj) and issubclass(obj, Evaluator)):
        raise TypeError(f"{obj!r} is not an Evaluator subclass")
    name = _check_name(obj, "evaluator")
    if not isinstance(getattr(obj, "summary", None), str) or not obj.summary.strip():
        raise ValueError(f"evaluator '{name}' has no summary")
    if not (inspect.isclass(obj.Options) and issubclass(obj.Options, EvaluatorOptions)):
        raise ValueError(f"evaluator '{name}': Options must subclass workbench.evaluator.EvaluatorOptions")
    return name


def load_registry(extra_plugins: list[tuple[Any, str]] | None = None) -> Registry:
    """Discover and load plugins now (tests pass ``extra_plugins`` as ``(plugin, name)`` pairs)."""
    registry = Registry()
    loader = _Loader(registry)
    loader.load_entry_points(_split_env("WORKBENCH_PLUGINS"), _split_env("WORKBENCH_DISABLE_PLUGINS"))
    for plugin, name in extra_plugins or []:
        loader.add(plugin, PluginInfo(name=name, package=name, version="local"))
    _building.stack.append(registry)
    try:
        loader.call("register_methods", registry.methods, check_method)
        loader.call("register_formats", registry.formats, check_format)
        loader.call("register_executors", registry.executors, check_executor)
        loader.call("register_evaluators", registry.evaluators, check_evaluator)
        loader.check_registered(registry.methods, "method", check_defaults)
    finally:
        _building.stack.pop()
    return registry


class _Building(threading.local):
    """The registries this thread is loading, innermost last."""

    def __init__(self) -> None:
        self.stack: list[Registry] = []


_building = _Building()
_cached: Registry | None = None
_lock = threading.Lock()


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded once, on first use.

    Code that runs while a registry is loading (a parameter validator checked at registration that
    looks up another method) gets that registry, not a new load of its own."""
    global _cached
    if _building.stack and not reload:
        return _building.stack[-1]
    with _lock:
        if _cached is None or reload:
            _cached = load_registry()
        return _cached


def require_plugins(registry: Registry) -> None:
    if not registry.methods:
        problems = " ".join(registry.problems)
        raise PluginError(
            "no merge methods are registered: is merge-workbench installed (pip install -e .)? " + problems
        )
