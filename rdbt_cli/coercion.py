"""Option values converted without pydantic, so a command starts in a fraction of a second.

Typer 0.2x converts every option's value through a pydantic TypeAdapter, built on first use for each option, even one
left out (whose value is None). `rdbt gen` has some 60 options: importing pydantic and building their adapters took
a quarter of a second of each run, more than a warm server takes to make a small image. `lighten` gives each option
of a command a converter that handles what the command line gives (a str for a str, int, float or Enum option, a
bool, a list of str, None) itself, and builds typer's own converter only for anything else: a value it cannot convert
this way (so typer's own error message), a range (min/max), a parser, a path. Older typers (click's conversion)
have no such converters and are left as they are.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum

try:
    from typer._coercion import RuntimeParam, build_runtime_param
except ImportError:  # a typer without pydantic conversion: nothing to lighten
    RuntimeParam = None

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_NO = object()


def _plain(annotation):
    """int for Optional[int] (and int | None); the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def convert(annotation, value):
    """`value` as `annotation` when the conversion is plain, else _NO (typer's converter decides, and words any
    error)."""
    kind = _plain(annotation)
    if kind is str:
        return value if isinstance(value, str) else _NO
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return int(value) if isinstance(value, str) and _INT.fullmatch(value) else _NO
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value) else _NO
    if isinstance(kind, type) and issubclass(kind, Enum):
        if isinstance(value, kind):
            return value
        return next((m for m in kind if isinstance(value, str) and m.value == value), _NO)
    if typing.get_origin(kind) is list and typing.get_args(kind) == (str,):
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    return _NO


if RuntimeParam is not None:

    @dataclass(frozen=True)
    class _Light(RuntimeParam):
        descriptor: object = None
        direct: bool = True  # False: every value but None goes to typer's converter (a range, a path, ...)
        built: dict = field(default_factory=dict)  # typer's own converter, once needed

        def _coerce_value(self, value, param, ctx):
            plain = convert(self.annotation, value) if self.direct else _NO
            if plain is not _NO:
                return plain
            if "typer" not in self.built:
                self.built["typer"] = build_runtime_param(self.descriptor)
            return self.built["typer"]._coerce_value(value, param=param, ctx=ctx)


def _direct(descriptor) -> bool:
    """No conversion of its own that only typer's converter knows: a range, a parser, a click type, a file or a
    path's checks."""
    info = descriptor.parameter_info
    return (getattr(info, "min", None) is None and getattr(info, "max", None) is None
            and getattr(info, "parser", None) is None and getattr(info, "click_type", None) is None
            and descriptor.file_annotation is None and not getattr(descriptor, "is_path", False))


def lighten(command, ctx) -> None:
    """Give the options of a click command built by typer the converter above (once; a no-op for other typers),
    --help included (`ctx`: the command's context or its parent's, which name the help options alike). A value of None
    (an option left out) never reaches a converter: typer returns it as it is."""
    if RuntimeParam is None or command is None or not hasattr(command, "get_params"):
        return
    try:
        lightened = []
        for param in command.get_params(ctx):
            descriptor = getattr(param, "type_descriptor", None)
            if descriptor is not None and getattr(param, "_runtime_param", _NO) is None:  # typer's, not built yet
                lightened.append((param, _Light(descriptor.parameter_info, descriptor.annotation, descriptor,
                                                _direct(descriptor))))
    except (TypeError, AttributeError, ValueError):
        return  # typer's private converters have changed shape: keep typer's own (slower, never wrong)
    for param, light in lightened:
        param._runtime_param = light
