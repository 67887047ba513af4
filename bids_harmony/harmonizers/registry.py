"""Every harmonizer by name, found by reading this package's modules with ``ast``.

A module whose class is decorated ``@register("name")`` is a harmonizer: the class's
docstring gives its one-line summary, a module-level ``PRESETS = {"name": Settings(...)}``
literal its presets and, through the ``Settings`` dataclass, its parameters; without
presets, the class's ``__init__`` keywords are its parameters. Nothing is imported until a
class is asked for, so listing the methods (``--help``, the descriptor) costs no numpy,
scipy or torch import, and an eleventh harmonizer is one new module with no list to edit.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bids_harmony.config import StrEnum
from bids_harmony.errors import UsageError

if TYPE_CHECKING:
    from bids_harmony.harmonizers.base import Harmonizer

H = TypeVar("H", bound="type[Harmonizer]")

#: Constructor keywords that come from their own command-line option, not from
#: ``--harmonizer-param``; a learned method's settings fields ``device`` and ``seed`` too.
DEDICATED_OPTIONS = {
    "preset": "--preset",
    "device": "--device",
    "seed": "--seed",
    "checkpoint_dir": "--work-dir",
}
PRESETS_NAME = "PRESETS"
#: A default preset that the class resolves for the machine (``cpu`` without a GPU, else
#: ``fast``); its parameter schema is the ``cpu`` preset's.
AUTO_PRESET = "auto"
MACHINE_PRESET = "cpu"


class ParamKind(StrEnum):
    """What a parameter's ``--harmonizer-param KEY=VALUE`` value is read as."""

    INT = "int"
    FLOAT = "float"
    STR = "str"
    BOOL = "bool"
    INTS = "ints"
    FLOATS = "floats"


ANNOTATION_KINDS = {
    "int": ParamKind.INT,
    "float": ParamKind.FLOAT,
    "str": ParamKind.STR,
    "bool": ParamKind.BOOL,
    "tuple[int, ...]": ParamKind.INTS,
    "Sequence[int]": ParamKind.INTS,
    "tuple[float, ...]": ParamKind.FLOATS,
    "Sequence[float]": ParamKind.FLOATS,
}
KIND_WORDS = {
    ParamKind.INT: "an integer",
    ParamKind.FLOAT: "a number",
    ParamKind.STR: "a word",
    ParamKind.BOOL: "true or false",
    ParamKind.INTS: "comma-separated integers",
    ParamKind.FLOATS: "comma-separated numbers",
}
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class Parameter:
    """One tunable parameter of a harmonizer, with its default (a preset's, if any)."""

    name: str
    kind: ParamKind
    default: Any

    def parse(self, text: str) -> Any:
        """The typed value of ``--harmonizer-param name=text``; a bad one is a UsageError."""
        try:
            if self.kind is ParamKind.BOOL:
                return BOOL_WORDS[text.strip().lower()]
            if self.kind in (ParamKind.INTS, ParamKind.FLOATS):
                item = int if self.kind is ParamKind.INTS else float
                return tuple(item(part) for part in text.split(","))
            return {ParamKind.INT: int, ParamKind.FLOAT: float, ParamKind.STR: str}[self.kind](
                text)
        except (KeyError, ValueError):
            raise UsageError(
                f"--harmonizer-param {self.name}={text}: {self.name} takes "
                f"{KIND_WORDS[self.kind]}, e.g. {self.name}={format_value(self.default)}"
            ) from None


def format_value(value: Any) -> str:
    """A value as ``--harmonizer-param`` writes it: ``1,2,4`` for tuples, ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(item) for item in value)
    return str(value)


@dataclass(frozen=True)
class MethodInfo:
    """What the source says about one harmonizer, read without importing it."""

    name: str
    module: str
    class_name: str
    summary: str
    #: Preset names in the module's order; empty for a method without presets.
    presets: tuple[str, ...]
    default_preset: str | None
    #: The tunable parameters for each preset (key ``None`` when there are no presets).
    schemas: Mapping[str | None, tuple[Parameter, ...]]
    #: The :data:`DEDICATED_OPTIONS` this method's constructor takes.
    dedicated: frozenset[str]
    #: The method's paper (its class's ``citation`` literal; "" for none), for the methods
    #: section: read here so writing it never imports PyTorch.
    citation: str = ""

    def parameters(self, preset: str | None = None) -> tuple[Parameter, ...]:
        """The schema at ``preset`` (default: the method's own default preset)."""
        return self.schemas[self.check_preset(preset)]

    def check_preset(self, preset: str | None) -> str | None:
        """``preset`` or the default; a preset this method lacks is a UsageError."""
        if not self.presets:
            if preset is not None:
                raise UsageError(
                    f"--preset {preset}: {self.name} has no presets; drop --preset (it sizes "
                    "the learned harmonizers)"
                )
            return None
        if preset is None:
            return self.default_preset
        if preset not in self.presets:
            raise UsageError(
                f"--preset {preset}: {self.name} presets are {', '.join(self.presets)}; "
                "choose one of them"
            )
        return preset

    def parse_params(self, preset: str | None, params: Mapping[str, str]) -> dict[str, Any]:
        """Typed ``--harmonizer-param`` values; an unknown key names the valid ones."""
        schema = {parameter.name: parameter for parameter in self.parameters(preset)}
        typed: dict[str, Any] = {}
        for key, text in params.items():
            if key in DEDICATED_OPTIONS:
                raise UsageError(
                    f"--harmonizer-param {key}: set it with {DEDICATED_OPTIONS[key]} instead"
                )
            if key not in schema:
                known = ", ".join(schema) or "none"
                raise UsageError(
                    f"--harmonizer-param {key}: {self.name} has no parameter '{key}'; "
                    f"its parameters: {known}"
                )
            typed[key] = schema[key].parse(text)
        return typed


class HarmonizerRegistry(Mapping[str, "type[Harmonizer]"]):
    """Harmonizer classes by name; the modules of ``directory`` are read on first use and
    each imported only when its class is asked for."""

    def __init__(self, package: str, directory: Path) -> None:
        self._package = package
        self._directory = directory

    @cached_property
    def methods(self) -> dict[str, MethodInfo]:
        """Every harmonizer's static description, by name (sorted)."""
        found: dict[str, MethodInfo] = {}
        for path in sorted(self._directory.glob("*.py")):
            for info in read_module(path, f"{self._package}.{path.stem}"):
                if info.name in found:
                    raise ValueError(f"harmonizer name '{info.name}' registered twice "
                                     f"({found[info.name].module}, {info.module})")
                found[info.name] = info
        return dict(sorted(found.items()))

    def info(self, name: str) -> MethodInfo:
        """The description of ``--method name``; an unknown name is a UsageError."""
        if name not in self.methods:
            raise UsageError(
                f"--method {name}: unknown harmonizer; choose one of {', '.join(self.methods)}"
            )
        return self.methods[name]

    def presets(self) -> tuple[str, ...]:
        """The union of every method's presets, in the order the modules give them."""
        return tuple(dict.fromkeys(p for info in self.methods.values() for p in info.presets))

    def preset_enum(self) -> type[StrEnum]:
        """``--preset`` choices as a StrEnum built from :meth:`presets`."""
        members = [(preset.upper(), preset) for preset in self.presets()]
        return StrEnum("Preset", members)  # type: ignore[return-value]

    def __getitem__(self, name: str) -> type[Harmonizer]:
        info = self.methods[name]
        return getattr(importlib.import_module(info.module), info.class_name)

    def __contains__(self, name: object) -> bool:
        return name in self.methods

    def __iter__(self) -> Iterator[str]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)


def register(name: str) -> Callable[[H], H]:
    """Class decorator: make a harmonizer ``--method name``. The registry finds it by
    reading the source; at import it only names the class."""

    def decorator(cls: H) -> H:
        cls.name = name
        return cls

    return decorator


HARMONIZERS = HarmonizerRegistry(__package__ or "bids_harmony.harmonizers",
                                 Path(__file__).resolve().parent)


def from_options(
    method: str,
    preset: str | None = None,
    device: str = "auto",
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    params: Mapping[str, str] | None = None,
) -> Harmonizer:
    """A fresh ``method`` harmonizer from command-line options: ``params`` are the
    ``--harmonizer-param`` strings, typed and checked against the method's schema; preset,
    device, seed and checkpoint directory go to the methods that take them."""
    info = HARMONIZERS.info(method)
    chosen_preset = info.check_preset(preset)
    keywords = info.parse_params(chosen_preset, params or {})
    dedicated = {"preset": chosen_preset, "device": device, "seed": seed,
                 "checkpoint_dir": checkpoint_dir}
    keywords.update({key: dedicated[key] for key in info.dedicated})
    try:
        return HARMONIZERS[method](**keywords)
    except UsageError as error:
        if not params:
            raise
        given = " ".join(f"{key}={value}" for key, value in params.items())
        raise UsageError(f"{error} (from --harmonizer-param {given})") from None


# -- reading the source ----------------------------------------------------------------------
def read_module(path: Path, module: str) -> list[MethodInfo]:
    """The harmonizers a module registers, from its syntax tree alone."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    constants = _module_constants(tree)
    presets = _module_presets(tree, classes, module)
    found = []
    for node in classes.values():
        name = _registered_name(node)
        if name is None:
            continue
        keywords, dedicated_defaults = _init_keywords(node, constants, module)
        if presets:
            schemas: dict[str | None, tuple[Parameter, ...]] = {
                preset: tuple(p for p in fields if p.name not in DEDICATED_OPTIONS)
                for preset, fields in presets.items()
            }
            settings_names = {p.name for p in next(iter(presets.values()))}
            dedicated = (set(dedicated_defaults) | settings_names) & set(DEDICATED_OPTIONS)
            default_preset = dedicated_defaults.get("preset", next(iter(presets)))
            if default_preset == AUTO_PRESET:
                schemas = {AUTO_PRESET: schemas.get(MACHINE_PRESET, next(iter(schemas.values()))),
                           **schemas}
        else:
            schemas = {None: keywords}
            dedicated = set(dedicated_defaults)
            default_preset = None
        found.append(MethodInfo(
            name=name, module=module, class_name=node.name,
            summary=(ast.get_docstring(node) or "").strip().splitlines()[0],
            presets=tuple(schemas) if presets else (), default_preset=default_preset,
            schemas=schemas,
            dedicated=frozenset(dedicated), citation=_class_citation(node),
        ))
    return found


def _class_citation(node: ast.ClassDef) -> str:
    """The string literal a class body binds to ``citation``, or ""."""
    for statement in node.body:
        target, value = _assignment(statement)
        if target == "citation" and value is not None:
            return str(ast.literal_eval(value))
    return ""


def _registered_name(node: ast.ClassDef) -> str | None:
    """``name`` of a ``@register("name")`` decorator, else None."""
    for decorator in node.decorator_list:
        if (isinstance(decorator, ast.Call) and decorator.args
                and getattr(decorator.func, "id", getattr(decorator.func, "attr", None))
                == "register"):
            return ast.literal_eval(decorator.args[0])
    return None


def _module_constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level names bound to literals (the defaults a signature may refer to)."""
    constants: dict[str, Any] = {}
    for node in tree.body:
        target, value = _assignment(node)
        if target is not None and value is not None:
            try:
                constants[target] = ast.literal_eval(value)
            except ValueError:
                continue
    return constants


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        return (target.id if isinstance(target, ast.Name) else None), node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def _module_presets(tree: ast.Module, classes: Mapping[str, ast.ClassDef],
                    module: str) -> dict[str, tuple[Parameter, ...]]:
    """``PRESETS = {"name": Settings(...)}``: every settings field at each preset."""
    for node in tree.body:
        target, value = _assignment(node)
        if target != PRESETS_NAME or value is None:
            continue
        if not isinstance(value, ast.Dict):
            raise ValueError(f"{module}.{PRESETS_NAME} must be a dict literal")
        presets = {}
        for key, call in zip(value.keys, value.values):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id in classes and key is not None):
                raise ValueError(f"{module}.{PRESETS_NAME} values must be calls of a "
                                 "settings dataclass of the module")
            presets[ast.literal_eval(key)] = _preset_fields(classes[call.func.id], call, module)
        return presets
    return {}


def _preset_fields(settings: ast.ClassDef, call: ast.Call, module: str) -> tuple[Parameter, ...]:
    """The dataclass fields of ``settings`` with the values ``call`` gives them."""
    fields = [node for node in settings.body if isinstance(node, ast.AnnAssign)
              and isinstance(node.target, ast.Name)
              and not ast.unparse(node.annotation).startswith("ClassVar")]
    values = {field.target.id: ast.literal_eval(field.value)  # type: ignore[union-attr]
              for field in fields if field.value is not None}
    values.update({field.target.id: ast.literal_eval(arg)  # type: ignore[union-attr]
                   for field, arg in zip(fields, call.args)})
    values.update({keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                   if keyword.arg is not None})
    return tuple(
        Parameter(field.target.id, _kind(field.annotation, module),  # type: ignore[union-attr]
                  values[field.target.id])  # type: ignore[union-attr]
        for field in fields
    )


def _init_keywords(node: ast.ClassDef, constants: Mapping[str, Any],
                   module: str) -> tuple[tuple[Parameter, ...], dict[str, Any]]:
    """The keywords of the class's own ``__init__``: the tunable ones, and the
    :data:`DEDICATED_OPTIONS` with their defaults."""
    init = next((item for item in node.body
                 if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
    if init is None:
        return (), {}
    positional = init.args.posonlyargs + init.args.args
    arguments = list(zip(positional[len(positional) - len(init.args.defaults):],
                         init.args.defaults))
    arguments += [(arg, default) for arg, default in zip(init.args.kwonlyargs,
                                                         init.args.kw_defaults)
                  if default is not None]
    tunable: list[Parameter] = []
    dedicated: dict[str, Any] = {}
    for arg, default in arguments:
        value = (constants[default.id] if isinstance(default, ast.Name)
                 else ast.literal_eval(default))
        if arg.arg in DEDICATED_OPTIONS:
            dedicated[arg.arg] = value
        else:
            tunable.append(Parameter(arg.arg, _kind(arg.annotation, module), value))
    return tuple(tunable), dedicated


def _kind(annotation: ast.expr | None, module: str) -> ParamKind:
    text = ast.unparse(annotation) if annotation is not None else "(none)"
    if text not in ANNOTATION_KINDS:
        raise ValueError(f"{module}: parameter annotation '{text}' is not one of "
                         f"{', '.join(ANNOTATION_KINDS)}")
    return ANNOTATION_KINDS[text]
