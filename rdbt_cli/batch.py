"""Batch files and the resume manifest.

A batch file has one prompt per line; blank lines and lines starting with `#` are skipped. A prompt may be followed by
` --flag value` overrides in `rdbt gen`'s syntax, quoted with shell rules except that a backslash is an ordinary
character (Windows paths and ComfyUI's backslash escapes need no doubling):

    1girl, solo, cherry blossoms --steps 24 --seed 7 -n "lowres, blurry" --lora style:0.6

The prompt is the raw text before the first ` --flag` (or ` -n`), so apostrophes, backslash escapes and `(tag:1.2)`
weights in prompts are kept exactly as written; only the overrides go through shlex.

Resume: a job is one image, keyed by (line number, hash of the line text, image index). Each rank appends the jobs it
finished to its own `.rdbt-batch-<batch id>.rank<R>.jsonl` in the output folder, one fsync'd JSON line per image, so
ranks never write the same file and a crash loses at most the image being written. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rdbt_cli.config import GenParams, LoraSpec
from rdbt_cli.errors import ConfigError, OutputError
from rdbt_cli.presets import parse_size, value_problem

# flag -> GenParams field (None: not a GenParams field). Every flag takes exactly one value.
FLAGS = {
    "-n": "negative", "--negative": "negative", "--preset": None, "--sampler": "sampler", "--scheduler": "scheduler",
    "--steps": "steps", "--cfg": "cfg", "--shift": "shift", "--seed": "seed", "--size": None, "--width": "width",
    "--height": "height", "--count": "count", "--lora": "loras",
}
_CONVERT = {"steps": int, "count": int, "seed": int, "width": int, "height": int, "cfg": float, "shift": float}
_FLAG_LIST = "-n/--negative, --preset, --sampler, --scheduler, --steps, --cfg, --shift, --seed, --size, --width, " \
             "--height, --count, --lora NAME[:WEIGHT]"
# Where the overrides start: the first " --word" or " -n" that stands as its own token.
_FIRST_FLAG = re.compile(r"(?:^|\s)(--[A-Za-z]|-n(?:\s|=|$))")
_WEIGHT = re.compile(r"^(.*):([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


@dataclass
class BatchLine:
    lineno: int  # 1-based, in the batch file
    prompt: str
    overrides: GenParams  # the line's flags (None = not given); overrides.prompt is the prompt
    preset: str | None = None
    error: str | None = None  # set for a bad line, which makes no images; the rest of the batch goes on
    text: str = ""  # the line as written (stripped), hashed into its job keys


@dataclass(frozen=True)
class Job:
    lineno: int
    line_hash: str
    index: int  # image index within the line's --count; seed = line seed + index
    ordinal: int  # position among all jobs of the batch, done or not

    @property
    def key(self) -> str:
        return f"{self.lineno}:{self.line_hash}:{self.index}"


def parse_lora_arg(text: str) -> LoraSpec:
    """"name:0.7" -> LoraSpec("name", 0.7); only a trailing `:<number>` is a weight, so `C:\\loras\\x` stays a name."""
    text = text.strip()
    m = _WEIGHT.match(text)
    name, weight = (m.group(1), float(m.group(2))) if m else (text, 1.0)
    if not name:
        raise ConfigError(f'--lora "{text}": missing the LoRA name; write NAME or NAME:WEIGHT, e.g. style:0.7')
    return LoraSpec(name, weight)


def line_hash(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:12]


def _normalize(text: str) -> str:
    # Same batch id for the same file saved with a BOM or Windows line endings.
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def batch_id(text: str) -> str:
    """Identifies a batch by its content: re-running the same file resumes it, any edit starts a fresh batch."""
    return hashlib.sha256(_normalize(text).encode("utf-8")).hexdigest()[:16]


def _apply_flag(flag: str, value: str, line: BatchLine) -> None:
    """Set one override; raises ConfigError with the problem (without the line number)."""
    over = line.overrides
    if flag == "--preset":
        if not value.strip():
            raise ConfigError("--preset needs a preset name or a .toml path")
        line.preset = value
        return
    if flag == "--size":
        over.width, over.height = parse_size(value)
        return
    key = FLAGS[flag]
    if key == "loras":
        over.loras = [*(over.loras or []), parse_lora_arg(value)]
        return
    convert = _CONVERT.get(key, str)
    try:
        converted = convert(value)
    except ValueError:
        kind = "a whole number" if convert is int else "a number"
        raise ConfigError(f"{flag} needs {kind}, not {value!r}") from None
    problem = value_problem(key, converted)
    if problem:
        raise ConfigError(f"{flag}: {problem}")
    setattr(over, key, converted)


def _split(text: str) -> list[str]:
    # Shell quoting without backslash escapes: Windows paths and ComfyUI's \( \) escapes pass through untouched.
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    lexer.escape = ""
    return list(lexer)


def _parse_line(lineno: int, text: str) -> BatchLine:
    m = _FIRST_FLAG.search(text)
    prompt, rest = (text[: m.start(1)].strip(), text[m.start(1):]) if m else (text, "")
    line = BatchLine(lineno, prompt, GenParams(prompt=prompt), text=text)
    if not prompt:
        line.error = f"line {lineno}: no prompt before the flags; put the prompt first, e.g. 1girl, solo --steps 20"
        return line
    try:
        tokens = _split(rest)
    except ValueError as e:
        line.error = f"line {lineno}: cannot split the flags ({e}); close the quote"
        return line
    i = 0
    try:
        while i < len(tokens):
            token = tokens[i]
            flag, eq, value = token.partition("=") if token.startswith("-") else (token, "", "")
            if not flag.startswith("-"):
                raise ConfigError(f"unexpected {token!r} after the flags; quote a value that has spaces")
            if flag not in FLAGS:
                raise ConfigError(f"unknown flag {flag!r}; batch lines accept {_FLAG_LIST}")
            if not eq:
                if i + 1 >= len(tokens):
                    raise ConfigError(f"{flag} needs a value")
                i += 1
                value = tokens[i]
            _apply_flag(flag, value, line)
            i += 1
    except ConfigError as e:
        line.error = f"line {lineno}: {e}"
    return line


def parse_batch(text: str) -> list[BatchLine]:
    """One BatchLine per prompt line; a bad line carries `error` instead of raising, so the rest of the batch runs."""
    lines = []
    for lineno, raw in enumerate(_normalize(text).split("\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        lines.append(_parse_line(lineno, stripped))
    return lines


def read_batch_source(path_or_dash: str | os.PathLike) -> str:
    """The text of a batch file, or of stdin for "-"."""
    if str(path_or_dash) == "-":
        return sys.stdin.read()
    path = Path(path_or_dash)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: batch file not found; give a text file with one prompt per line, or - for stdin") \
            from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give a text file with one prompt per line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the batch file as UTF-8") from None


def merge_flags(base: GenParams, line: GenParams) -> GenParams:
    """A batch line's overrides on top of the batch command's flags; LoRAs add up as layers (line last)."""
    out = GenParams()
    for name in GenParams.__dataclass_fields__:
        value = getattr(line, name)
        setattr(out, name, value if value is not None else getattr(base, name))
    if base.loras is not None or line.loras is not None:
        out.loras = [*(base.loras or []), *(line.loras or [])]
    return out


def line_seed(batch: str, lineno: int) -> int:
    """A seed for a line that gives none, fixed by the batch content, so a resumed line continues its seed series."""
    return int.from_bytes(hashlib.sha256(f"{batch}:{lineno}".encode()).digest()[:4], "big")


# ---------------------------------------------------------------------------------------------------------------------
# Planning and the manifest


def plan_jobs(
    lines: Sequence[BatchLine],
    resolved_counts: Sequence[int] | Mapping[int, int],
    rank: int = 0,
    world: int = 1,
    done: Mapping[str, object] | None = None,
) -> list[Job]:
    """This rank's jobs, in file order, without those already done.

    `resolved_counts` gives each line's image count, aligned with `lines` or keyed by line number; bad lines make no
    jobs. Every job of the batch, done or not, gets an ordinal, and rank r makes the jobs with ordinal % world == r.
    Split by job rather than by line so a line with --count 8 spreads over all ranks; count done jobs too, so the
    split is a pure function of the file and the world size — ranks that read the manifest at slightly different
    moments (another rank may have finished an image meanwhile) still agree on who owns what, and a resume with a
    different world size loses and repeats nothing.
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside a world of {world} processes; check RANK and WORLD_SIZE")
    counts = (
        [resolved_counts[line.lineno] for line in lines] if isinstance(resolved_counts, Mapping)
        else list(resolved_counts)
    )
    if len(counts) != len(lines):
        raise ValueError(f"{len(counts)} counts for {len(lines)} batch lines")
    done = done or {}
    jobs, ordinal = [], 0
    for line, count in zip(lines, counts):
        if line.error is not None:
            continue
        h = line_hash(line.text or line.prompt)
        for index in range(count):
            job = Job(line.lineno, h, index, ordinal)
            ordinal += 1
            if job.ordinal % world == rank and job.key not in done:
                jobs.append(job)
    return jobs


def manifest_path(out_dir: str | os.PathLike, batch: str, rank: int) -> Path:
    return Path(out_dir) / f".rdbt-batch-{batch}.rank{rank}.jsonl"


class Manifest:
    """This rank's append-only record of finished jobs; one fsync'd line per image."""

    def __init__(self, out_dir: str | os.PathLike, batch: str, rank: int = 0):
        self.path = manifest_path(out_dir, batch, rank)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab")
            # A crash can leave a torn last line; start on a fresh line so the next record is not glued to it.
            if self._f.tell() > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self._f.write(b"\n")
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the batch manifest ({e.strerror}); check the output "
                              "folder's permissions") from None

    def add(self, job: Job | str, file: str, seed: int, **extra) -> dict:
        """Record a finished image; call after its file is safely written."""
        record = {"job": job.key if isinstance(job, Job) else job, "file": str(file), "seed": int(seed), **extra}
        self._f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        return record

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_done(out_dir: str | os.PathLike, batch: str, *, require_files: bool = False) -> dict[str, dict]:
    """Finished jobs from every rank's manifest (any world size); torn or foreign lines are skipped.

    With `require_files`, a job whose image (relative to out_dir) is gone counts as not done.
    """
    out = Path(out_dir)
    done: dict[str, dict] = {}
    if not out.is_dir():
        return done
    for path in sorted(out.glob(f".rdbt-batch-{batch}.rank*.jsonl")):
        if not re.fullmatch(rf"\.rdbt-batch-{re.escape(batch)}\.rank\d+\.jsonl", path.name):
            continue
        for raw in path.read_bytes().split(b"\n"):
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(record, dict) or not isinstance(record.get("job"), str) or "file" not in record:
                continue
            if require_files and not (out / str(record["file"])).exists():
                continue
            done[record["job"]] = record
    return done


def torchrun_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; one process when they are absent."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers; launch with torchrun or unset them") \
            from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}; launch with torchrun or unset them")
    return rank, world, local_rank
