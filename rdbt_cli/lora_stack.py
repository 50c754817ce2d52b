"""The persistent LoRA stack behind `rdbt lora-stack`, and LoRA name resolution. No torch import: starts instantly.

The stack lives in `config.user_dir()/lora_stack.json` as {"version": 1, "loras": [{"name": ..., "weight": ...}]}.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rdbt_cli.config import LoraSpec, user_dir
from rdbt_cli.discovery import PICKLE_SUFFIXES, classify
from rdbt_cli.errors import LoraError, io_problem

STACK_FILE = "lora_stack.json"
STACK_VERSION = 1


def stack_path() -> Path:
    return user_dir() / STACK_FILE


def _check_weight(name: str, weight) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise LoraError(f"LoRA {name!r}: weight {weight!r} is not a number; give e.g. {name}:0.8") from None
    if not math.isfinite(w):
        raise LoraError(f"LoRA {name!r}: weight {weight!r} is not a finite number; give e.g. {name}:0.8")
    return w


def load_stack() -> list[LoraSpec]:
    """The saved stack, in order; [] when none was saved."""
    path = stack_path()
    if not path.exists():
        return []
    fix = f"fix or delete {path}, or run `rdbt lora-stack --clear`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path}: unreadable LoRA stack ({exc.__class__.__name__}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("loras"), list):
        raise LoraError(f"{path}: not a LoRA stack (no 'loras' list); {fix}")
    version = data.get("version", STACK_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LoraError(f"{path}: stack version {version!r} is not a whole number; {fix}")
    if version > STACK_VERSION:
        raise LoraError(f"{path}: written by a newer rdbt (stack version {data['version']}); upgrade rdbt or {fix}")
    specs = []
    for i, entry in enumerate(data["loras"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise LoraError(f"{path}: entry {i + 1} has no LoRA name; {fix}")
        specs.append(LoraSpec(entry["name"], _check_weight(entry["name"], entry.get("weight", 1.0))))
    return specs


def save_stack(specs: list[LoraSpec]) -> Path:
    """Write the stack atomically (a temp file in the same folder, then a rename): a crash never leaves half a file."""
    path = stack_path()
    data = {"version": STACK_VERSION,
            "loras": [{"name": s.name, "weight": _check_weight(s.name, s.weight)} for s in specs]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lora_stack.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise LoraError(f"{path}: cannot save the LoRA stack: {io_problem(exc)}") from None
    return path


@contextmanager
def _editing():
    """One editor at a time: parallel `lora-stack` commands (scripts, several terminals) each read the stack another
    has finished writing, so no update is lost; the write itself is an atomic replace."""
    from filelock import FileLock, Timeout  # here: gen and batch read the stack, only edits lock it (20 ms)

    path = stack_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(f".{path.name}.lock"), timeout=60):
            yield
    except Timeout:
        raise LoraError(f"{path}: another rdbt has been editing the LoRA stack for a minute; try again when it is "
                        "done") from None
    except OSError as exc:
        raise LoraError(f"{path}: cannot lock the LoRA stack ({exc.strerror}); check that the folder is "
                        "writable") from None


def _names(spec: LoraSpec) -> tuple[str, ...]:
    """What an entry answers to: its name, and for a file given by path its file name and stem as well."""
    if not _looks_like_path(spec.name):
        return (spec.name,)
    p = Path(spec.name)
    return spec.name, p.name, p.stem


def _find(specs: list[LoraSpec], name: str) -> int:
    """Index of `name` in the stack: exact (a path entry also by its path as typed, file name or stem), else a
    unique prefix."""
    typed = Path(name).expanduser()
    if _looks_like_path(name) and typed.exists():
        name = str(typed.resolve())  # the path as `add` stored it
    for i, s in enumerate(specs):
        if name in _names(s):
            return i
    hits = [i for i, s in enumerate(specs) if any(n.startswith(name) for n in _names(s))]
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(s.name for s in specs) or "the stack is empty"
    if hits:
        raise LoraError(f"LoRA {name!r} is ambiguous in the stack: {', '.join(specs[i].name for i in hits)}; "
                        "give more of the name")
    raise LoraError(f"LoRA {name!r} is not in the stack ({listed}); see `rdbt lora-stack --list`")


def add(spec: LoraSpec, lora_dirs: list[str | os.PathLike] | None = None) -> list[LoraSpec]:
    """Append `spec`; a LoRA already in the stack keeps its place and takes the new weight.

    With `lora_dirs`, a name must resolve now, not at the next gen, and a path is stored absolute, so the stack works
    from any folder."""
    _check_weight(spec.name, spec.weight)
    if lora_dirs is not None:
        if Path(spec.name).expanduser().is_file():
            spec = LoraSpec(str(Path(spec.name).expanduser().resolve()), spec.weight)
            check_lora_file(Path(spec.name))
        else:
            check_lora_file(resolve_lora_name(spec.name, lora_dirs))
    with _editing():
        specs = load_stack()
        for i, s in enumerate(specs):
            if s.name == spec.name:
                specs[i] = spec
                break
        else:
            specs.append(spec)
        save_stack(specs)
    return specs


def check_lora_file(path: Path) -> None:
    """What the stack stores must be a whole safetensors LoRA, so that a bad entry cannot break every later gen.
    Only the header is read (no torch)."""
    info = classify(path)
    if info.kind == "lora":
        return
    if info.kind == "broken":
        raise LoraError(f"{info.details['error']}; not added to the LoRA stack")
    if info.kind in ("pickle", "gguf"):
        raise LoraError(f"{path}: {info.kind} files are never loaded as LoRAs; use a .safetensors LoRA")
    what = {"dit": "a diffusion model", "te": "a text encoder", "vae": "a VAE", "aio": "a full checkpoint"}.get(
        info.kind, info.details.get("note", "").split(";")[0] or "a file with no adapter tensors rdbt knows")
    fix = "pass it with --model" if info.kind in ("dit", "aio") else "give a LoRA file"
    raise LoraError(f"{path}: is {what}, not a LoRA; not added to the LoRA stack ({fix})")


def set_weight(name: str, weight: float) -> list[LoraSpec]:
    with _editing():
        specs = load_stack()
        i = _find(specs, name)
        specs[i] = LoraSpec(specs[i].name, _check_weight(name, weight))
        save_stack(specs)
    return specs


def remove(name: str) -> list[LoraSpec]:
    with _editing():
        specs = load_stack()
        del specs[_find(specs, name)]
        save_stack(specs)
    return specs


def clear() -> list[LoraSpec]:
    with _editing():
        save_stack([])
    return []


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.lower().endswith(".safetensors") or name.startswith(("~", "."))


def resolve_lora_name(name: str, lora_dirs: list[str | os.PathLike]) -> Path:
    """A LoRA file from a path, or a name in `lora_dirs` (ComfyUI `loras/` folders, searched with subfolders).

    A name matches a file's stem or its path inside a folder without `.safetensors`: exactly first, then
    case-insensitively, then as a unique prefix. Several candidates raise LoraError listing them.
    """
    p = Path(name).expanduser()
    if p.is_file():
        return p
    dirs = [Path(d).expanduser() for d in lora_dirs]
    found: list[tuple[str, Path]] = []  # (name inside its folder, file)
    pickles: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for f in sorted(d.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(d).with_suffix("").as_posix()
            if f.suffix.lower() == ".safetensors":
                found.append((rel, f))
            elif f.suffix.lower() in PICKLE_SUFFIXES:
                pickles.append(f)
    key = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    key = key.replace(os.sep, "/")

    def stems(f: Path, rel: str) -> tuple[str, str]:
        return f.stem, rel

    for match in (
        lambda a: a == key,
        lambda a: a.lower() == key.lower(),
        lambda a: a.lower().startswith(key.lower()),
    ):
        hits = []
        for rel, f in found:
            if any(match(a) for a in stems(f, rel)) and f not in hits:
                hits.append(f)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(str(h) for h in hits[:8]) + (f" (+{len(hits) - 8} more)" if len(hits) > 8 else "")
            raise LoraError(f"LoRA name {name!r} is ambiguous: {listed}; give more of the name or a path")
    pickled = [f for f in pickles if f.stem.lower().startswith(key.lower())]
    if pickled:
        raise LoraError(f"{pickled[0]}: pickle LoRAs ({pickled[0].suffix}) are never loaded; "
                        "convert it to .safetensors")
    stem, colon, weight = name.rpartition(":")
    if colon and stem and not _looks_like_path(weight):  # `style:abc`: a weight that is not a number
        raise LoraError(f"LoRA {name!r}: the weight {weight!r} is not a number; write NAME:WEIGHT, e.g. {stem}:0.7")
    if _looks_like_path(name):
        raise LoraError(f"{p}: LoRA file not found; check the path")
    where = f"in {', '.join(str(d) for d in dirs)}" if dirs else "(no loras/ folder was found)"
    raise LoraError(f"LoRA {name!r} not found {where}; put the .safetensors file in a loras/ folder or give its path")
