"""File-name templates: `--name "{seed}-{sampler}-{steps}-{prompt:40}"` names each image from its own settings.

The fields are the rows of the settings table (so a new setting is a field at once) and a few facts about the image:
`index` (within --count), `line` (the batch line), `model`, `preset`, `size`, `date` and `time`. `{field:N}` keeps
the first N characters; any other spec is Python's format spec for a number field (`{cfg:.1f}`, `{index:03d}`).
A template is checked when it is read, before anything loads. What a template renders is only the file's stem:
metadata.save_png adds `.png` and numbers a name that is taken, so a template never overwrites an image.
No torch here.
"""

from __future__ import annotations

import re
import string
import time
import unicodedata
from pathlib import Path
from typing import Optional

from rdbt_cli.errors import ConfigError
from rdbt_cli.settings import SETTINGS

# Facts about the image beside its settings, with a sample value of their type (to check a format spec early).
_EXTRA = {"index": 0, "line": 0, "model": "", "preset": "", "size": "", "date": "", "time": ""}
FIELDS = {**{s.name: (0 if s.type is int else 0.0 if s.type is float else "") for s in SETTINGS}, **_EXTRA}

# File names stay below 255 bytes with room for the `-0001` numbering and save_png's temp name
# (`.<stem>.<host>-<pid>-<hex>.tmp`).
MAX_STEM_BYTES = 120
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')  # separators, Windows' reserved characters, control characters
_WINDOWS_DEVICES = re.compile(r"(?i)(con|prn|aux|nul|com\d|lpt\d)(\..*)?")


def safe_stem(text: str, max_bytes: int = MAX_STEM_BYTES) -> str:
    """`text` as one file name without extension: no path separators, no control or reserved characters (each
    becomes `_`), whitespace runs as one space, no leading dot (a hidden file) or trailing dot or space (Windows drops
    them), at most `max_bytes` of UTF-8 cut at a character boundary; "rdbt" when nothing is left."""
    text = unicodedata.normalize("NFC", text)
    text = "".join("_" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and not c.isspace() else c
                   for c in text)  # invisible format characters (bidi overrides) would disguise the name
    text = _UNSAFE.sub("_", re.sub(r"\s+", " ", text)).strip(" ")
    text = text.lstrip(".")
    data = text.encode("utf-8")[:max_bytes]
    text = data.decode("utf-8", errors="ignore").rstrip(" .")
    if _WINDOWS_DEVICES.fullmatch(text):
        text = "_" + text
    return text or "rdbt"


def _value_text(name: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):  # LoRAs: file stems and weights, turbo-0.3+style-1
        return "+".join(f"{Path(str(getattr(s, 'name', s))).stem}-{getattr(s, 'weight', 1.0):g}" for s in value)
    if name in ("init_image", "mask", "model") and value:
        return Path(str(value)).stem
    return str(value)


class NameTemplate:
    """A checked `--name` template; `stem(...)` renders one image's file stem."""

    def __init__(self, template: str):
        self.template = template
        self.parts: list[tuple[str, Optional[str], str]] = []  # (literal text, field or None, format spec)
        known = ", ".join(FIELDS)
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as err:
            raise ConfigError(f"--name {template!r}: {err}; write fields as {{seed}} and a literal brace as {{{{ or "
                              "}}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None and field not in FIELDS:
                raise ConfigError(f"--name {template!r}: unknown field {{{field}}}; known fields: {known}")
            if conversion:
                raise ConfigError(f"--name {template!r}: {{{field}!{conversion}}} is not supported; write "
                                  f"{{{field}}} or {{{field}:N}} for the first N characters")
            if field is not None and spec and not spec.isdigit():
                try:
                    format(FIELDS[field], spec)
                except (ValueError, TypeError):
                    raise ConfigError(f"--name {template!r}: format {spec!r} does not fit {{{field}}}; use "
                                      f"{{{field}:N}} for the first N characters") from None
            self.parts.append((literal, field, spec or ""))

    def stem(self, settings, *, seed: int, index: int = 0, line: Optional[int] = None, model: Optional[str] = None,
             preset: Optional[str] = None, now: Optional[float] = None) -> str:
        """The file stem for one image from its resolved `settings` (GenParams) and facts."""
        stamp = time.localtime(now)
        values = {s.name: getattr(settings, s.name, None) for s in SETTINGS}
        values.update(seed=seed, index=index, line=line, model=model, preset=preset,
                      size=f"{settings.width}x{settings.height}", date=time.strftime("%Y%m%d", stamp),
                      time=time.strftime("%H%M%S", stamp))
        out = []
        for literal, field, spec in self.parts:
            out.append(literal)
            if field is None:
                continue
            value = values.get(field)
            if spec.isdigit():
                out.append(_value_text(field, value)[: int(spec)])
            elif spec and value is not None:
                try:
                    out.append(format(value, spec))
                except (ValueError, TypeError):
                    out.append(_value_text(field, value))
            else:
                out.append(_value_text(field, value))
        return safe_stem("".join(out))


def parse(template: Optional[str]) -> Optional[NameTemplate]:
    """A checked template, or None for none (each command's own default name)."""
    if template is None:
        return None
    if not template.strip():
        raise ConfigError('--name is empty; give a template such as "{seed}-{prompt:40}"')
    return NameTemplate(template)
