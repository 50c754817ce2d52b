"""Presets: named TOML files of generation settings (the preset keys of settings.SETTINGS), found and validated.

Built-in presets ship in the wheel as `rdbt_cli/presets/` (the repository's `presets/`, force-included by
pyproject); user presets are `user_dir()/presets/*.toml` and override a built-in of the same name. No torch here, so
every mistake is reported, with its file and line, before any weights are read.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from rdbt_cli.config import LoraSpec, user_dir
from rdbt_cli.errors import ConfigError
from rdbt_cli.settings import SETTINGS, GenParams, is_number, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# What a preset file may set: the table's preset keys, `size` for width and height together, and what only presets
# carry.
PRESET_KEYS = ("description", "model", *(s.preset for s in SETTINGS if s.preset), "size")
LORA_KEYS = ("name", "weight")
_BY_KEY = {s.preset: s for s in SETTINGS if s.preset}


class PresetInfo(NamedTuple):
    name: str
    path: Path
    source: str  # "builtin" or "user"
    description: str | None
    error: str | None = None  # why the file is not a valid preset (file:line: problem), as `--preset` would say


@dataclass
class Preset(GenParams):
    """A preset's settings as GenParams (None = the preset does not set it), plus what only presets carry."""

    name: str = ""
    path: Path | None = None
    model: str | None = None
    description: str | None = None
    loras: list[LoraSpec] | None = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Finding presets


def builtin_dir() -> Path:
    """The bundled presets: package data in an installed wheel, the repository's presets/ in a source checkout."""
    packaged = resources.files("rdbt_cli") / "presets"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "presets"


def user_presets_dir() -> Path:
    return user_dir() / "presets"


def _info(path: Path, source: str) -> PresetInfo:
    """A preset file for the list, validated as `--preset` validates it, so a bad file is listed with its problem."""
    try:
        preset = _read(path, path.stem)
    except ConfigError as err:
        return PresetInfo(path.stem, path, source, None, str(err))
    return PresetInfo(path.stem, path, source, preset.description)


def list_presets() -> list[PresetInfo]:
    """Every preset by name, sorted; a user preset hides the built-in of the same name."""
    found: dict[str, PresetInfo] = {}
    for source, folder in (("builtin", builtin_dir()), ("user", user_presets_dir())):
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found[path.stem] = _info(path, source)
    return [found[name] for name in sorted(found)]


# ---------------------------------------------------------------------------------------------------------------------
# Loading and validating one preset

_HEADER = re.compile(r"""^\s*(\[\[?)\s*(["']?)([^\]"']+?)\2\s*\]""")
_KEY = re.compile(r"""^\s*(["']?)([A-Za-z0-9_-]+)\1\s*=""")


def _line_of(text: str, key: str, table: str | None = None, index: int = 0) -> int:
    """1-based line of `key` at the top level (table None) or in the index-th [[table]]; tomllib gives no positions."""
    current: tuple[str | None, int] = (None, 0)
    seen: dict[str, int] = {}
    header_line = 1
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            name = m.group(3).strip()
            if m.group(1) == "[[":
                seen[name] = seen.get(name, -1) + 1
                current = (name, seen[name])
            else:
                current = (name, 0)
            if table is None and name == key:
                return n
            if current == (table, index):
                header_line = n
            continue
        m = _KEY.match(line)
        if m and m.group(2) == key and current == (table, index):
            return n
    return header_line


def _type_name(v: object) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _parse_lora_tables(value: object, where) -> list[LoraSpec]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(where("lora", None, 0, f"lora must be [[lora]] tables with name and weight, "
                                               f"not {_type_name(value)}"))
    specs = []
    for i, table in enumerate(value):
        for key in table:
            if key not in LORA_KEYS:
                raise ConfigError(where(key, "lora", i, f'unknown key "{key}" in [[lora]]; valid keys: '
                                                        f"{', '.join(LORA_KEYS)}"))
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(where("name", "lora", i, "each [[lora]] needs name = \"<file stem or path>\""))
        weight = table.get("weight", 1.0)
        if not is_number(weight):
            raise ConfigError(where("weight", "lora", i, f"lora weight must be a number, not {weight!r}"))
        specs.append(LoraSpec(name.strip(), float(weight)))
    return specs


def parse_preset(text: str, path: Path | str, name: str | None = None) -> Preset:
    """Validate the TOML `text` of the preset file `path`; every error is one line with the file, line and fix."""
    path = Path(path)

    def where(key: str, table: str | None, index: int, problem: str) -> str:
        return f"{path}:{_line_of(text, key, table, index)}: {problem}"

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        line = getattr(e, "lineno", None)
        m = re.search(r"\s*\(at line (\d+), column \d+\)$", msg)
        if m:
            line, msg = line or int(m.group(1)), msg[: m.start()]
        elif msg.endswith("(at end of document)"):
            line, msg = line or max(1, len(text.splitlines())), msg[: -len("(at end of document)")].rstrip()
        raise ConfigError(f"{path}:{line or 1}: not valid TOML ({msg}); write settings as key = value, "
                          f"e.g. steps = 20") from None

    preset = Preset(name=name or path.stem, path=path)
    for key, value in data.items():
        if key not in PRESET_KEYS:
            raise ConfigError(where(key, None, 0, f'unknown key "{key}"; valid keys: {", ".join(PRESET_KEYS)}'))
        if key == "lora":
            preset.loras = _parse_lora_tables(value, where)
        elif key == "size":
            if not isinstance(value, str):
                raise ConfigError(where(key, None, 0, f'size must be a string like "832x1216", not {value!r}'))
            try:
                preset.width, preset.height = parse_size(value)
            except ConfigError as e:
                raise ConfigError(where(key, None, 0, str(e))) from None
        elif key in _BY_KEY:
            setting = _BY_KEY[key]
            value = setting.coerce(value)
            problem = setting.problem(value)
            if problem:
                raise ConfigError(where(key, None, 0, problem))
            setattr(preset, setting.name, value)
        else:  # model, description: text that only presets carry
            if not isinstance(value, str):
                raise ConfigError(where(key, None, 0, f"{key} must be a string, not {value!r}"))
            setattr(preset, key, value)
    if "size" in data and ("width" in data or "height" in data):
        raise ConfigError(where("width" if "width" in data else "height", None, 0,
                                "set either size or width/height, not both"))
    return preset


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by name (user presets first, then built-ins) or by the path of a .toml file."""
    text_arg = str(name_or_path)
    candidate = Path(text_arg).expanduser()
    if "/" in text_arg or "\\" in text_arg or (candidate.suffix == ".toml" and candidate.is_file()):
        if not candidate.is_file():
            raise ConfigError(f"{candidate}: preset file not found; give an existing .toml file or a preset name "
                              "(`rdbt presets` lists them)")
        path, name = candidate, candidate.stem
    else:
        name = text_arg.removesuffix(".toml")  # "turbo.toml" not in the current folder means the preset turbo
        known = {info.name: info for info in list_presets()}
        if name not in known:
            available = ", ".join(known) or "none"
            raise ConfigError(f'no preset named "{name}"; available presets: {available} '
                              f"(or put {name}.toml in {user_presets_dir()})")
        path = known[name].path
    return _read(path, name)


def _read(path: Path, name: str) -> Preset:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read preset ({e.__class__.__name__}: {e}); check the file") from None
    return parse_preset(text, path, name)


def resolve_model(preset: Preset | None, flag_model: str | None) -> str | None:
    """--model beats the preset's model; None leaves the choice to discovery."""
    if flag_model is not None:
        return flag_model
    return preset.model if preset is not None else None
