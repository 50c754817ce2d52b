"""Batch files and the resume manifest.

A batch file has one prompt per line; blank lines and lines starting with `#` are skipped. A prompt may be followed by
` --flag value` overrides in `rdbt gen`'s syntax, quoted with shell rules except that a backslash is an ordinary
character (Windows paths and ComfyUI's backslash escapes need no doubling):

    1girl, solo, cherry blossoms --steps 24 --seed 7 -n "lowres, blurry" --lora style:0.6

The prompt is the raw text before the first ` --flag` (or ` -n`), so apostrophes, backslash escapes and `(tag:1.2)`
weights in prompts are kept exactly as written; only the overrides go through shlex.

Resume: a job is one image, keyed by what makes it: the hash of its line's fully resolved settings (batch-wide flags,
preset, LoRA stack and the line's own overrides; its seed, which a line without --seed takes from its prompt) and
its index within --count. So a rerun makes only what is missing, and after an edit only the changed or new lines run:
every other image is reused, wherever its line moved. Each rank appends the jobs it finished to its own
`.rdbt-batch-jobs.rank<R>.jsonl` in the output folder, one fsync'd JSON line per image, so ranks never write the same
file and a crash loses at most the image being written. (Manifests of earlier versions, keyed by line number and named
after the whole file's hash, still resume the batch that wrote them.) No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from rdbt_cli.errors import ConfigError, OutputError, RdbtError, io_problem
from rdbt_cli.settings import SETTINGS, SIZE_FLAG, GenParams, images_of, parse_size, seed_at

# A batch line may override every setting the table marks `batch`, with its flags, plus --preset and --size.
_LINE_SETTINGS = {flag: s for s in SETTINGS if s.batch for flag in s.flags}
_FLAG_LIST = ", ".join(["/".join(s.flags) if s.type is not list else f"{s.flag} NAME[:WEIGHT]"
                        for s in SETTINGS if s.batch and s.flags] + ["--preset", SIZE_FLAG])
# Where the overrides start: the first " --word" or " -n" that stands as its own token.
_FIRST_FLAG = re.compile(r"(?:^|\s)(--[A-Za-z]|-n(?:\s|=|$))")


@dataclass
class BatchLine:
    lineno: int  # 1-based, in the batch file
    prompt: str
    overrides: GenParams  # the line's flags (None = not given); overrides.prompt is the prompt
    preset: str | None = None
    error: str | None = None  # set for a bad line, which makes no images; the rest of the batch goes on
    text: str = ""  # the line as written (stripped), hashed into its job keys


@dataclass(frozen=True)
class Task:
    lineno: int
    identity: str  # what makes the line's images: its resolved settings' hash
    index: int  # image index within the line's --count; seed = line seed + index
    ordinal: int  # position among all jobs of the batch, done or not

    @property
    def key(self) -> str:
        return f"{self.identity}:{self.index}"


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
    if flag == SIZE_FLAG:
        over.width, over.height = parse_size(value)
        return
    setting = _LINE_SETTINGS[flag]
    converted = setting.from_text(value)
    if setting.means_unset(converted):  # --seed -1: as if not given, so the line keeps its fixed seed
        setattr(over, setting.name, None)
        return
    problem = setting.problem(converted)
    if problem:
        raise ConfigError(f"{flag}: {problem}")
    if setting.type is list:  # repeatable: each flag adds one entry
        converted = [*(getattr(over, setting.name) or []), *converted]
    setattr(over, setting.name, converted)


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
            if flag not in _LINE_SETTINGS and flag not in ("--preset", SIZE_FLAG):
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


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 (a leading BOM dropped), or a ConfigError naming the first bad byte by line and column. No guessing at
    Latin-1 or cp1252: a guess would put other characters in the image and its recipe than the user wrote."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # the BOM Windows editors write
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError(f"{source}: byte 0x{data[exc.start]:02X} at line {line}, column {column} is not UTF-8; save "
                          "it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_stdin_text() -> str:
    return decode_text(sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode(),
                       "stdin")


def read_batch_source(path_or_dash: str | os.PathLike) -> str:
    """The text of a batch file, or of stdin for "-"."""
    if str(path_or_dash) == "-":
        return read_stdin_text()
    path = Path(path_or_dash)
    try:
        return decode_text(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: batch file not found; give a text file with one prompt per line, or - for stdin") \
            from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give a text file with one prompt per line") from None


def line_seed(batch: str, lineno: int) -> int:
    """A seed for a line that gives none, fixed by the batch content, so a resumed line continues its seed series.
    (How earlier versions seeded; kept for resuming their batches.)"""
    return int.from_bytes(hashlib.sha256(f"{batch}:{lineno}".encode()).digest()[:4], "big")


def text_seed(prompt: str, occurrence: int = 0) -> int:
    """A seed for a line that gives none, fixed by its prompt (and which line with that prompt it is), so editing,
    adding or moving other lines, changing its own overrides or the batch-wide flags keeps it."""
    return int.from_bytes(hashlib.sha256(f"{prompt.strip()}\0{occurrence}".encode()).digest()[:4], "big")


def job_identity(settings: GenParams, model, load) -> str:
    """The hash of everything that makes a line's images, but not how many (--count)."""
    made_of = {**vars(settings), "count": None, "model": model, "text_encoder": load.text_encoder, "vae": load.vae,
               "dtype": load.dtype}
    return hashlib.sha256(json.dumps(made_of, default=str, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Planning and the manifest


def plan_jobs(
    lines: Sequence[BatchLine],
    resolved_counts: Sequence[int] | Mapping[int, int],
    rank: int = 0,
    world: int = 1,
    done: Mapping[str, object] | None = None,
    identities: Mapping[int, str] | None = None,
) -> list[Task]:
    """This rank's jobs, in file order, without those already done.

    `identities` gives each line's job identity by line number (job_identity); without it, a line is identified by
    its number and text.

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
        identity = (identities[line.lineno] if identities is not None
                    else f"{line.lineno}:{line_hash(line.text or line.prompt)}")
        for index in range(count):
            job = Task(line.lineno, identity, index, ordinal)
            ordinal += 1
            if job.ordinal % world == rank and job.key not in done:
                jobs.append(job)
    return jobs


NEW_MANIFEST = "jobs"  # one set of manifests per output folder, keyed by job identity


def manifest_path(out_dir: str | os.PathLike, batch: str, rank: int) -> Path:
    return Path(out_dir) / f".rdbt-batch-{batch}.rank{rank}.jsonl"


class Manifest:
    """This rank's append-only record of finished jobs; one fsync'd line per image."""

    def __init__(self, out_dir: str | os.PathLike, batch: str, rank: int = 0):
        from filelock import FileLock, Timeout

        self.path = manifest_path(out_dir, batch, rank)
        # One writer per manifest: a second `rdbt batch` into the same folder would make the same images again
        # (torchrun ranks have manifests of their own).
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            raise OutputError(f"{self.path.parent}: another rdbt batch is already writing to this folder (rank "
                              f"{rank}); wait for it to finish or use another --out, then run the same command to "
                              "resume") from None
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the batch manifest ({e.strerror}); check the output "
                              "folder's permissions") from None
        try:
            self._f = open(self.path, "ab")
            # A crash can leave a torn last line; start on a fresh line so the next record is not glued to it.
            if self._f.tell() > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self._f.write(b"\n")
        except OSError as e:
            self._lock.release()
            raise OutputError(f"{self.path}: cannot write the batch manifest ({e.strerror}); check the output "
                              "folder's permissions") from None

    def add(self, job: Task | str, file: str, seed: int, **extra) -> dict:
        """Record a finished image; call after its file is safely written."""
        record = {"job": job.key if isinstance(job, Task) else job, "file": str(file), "seed": int(seed), **extra}
        try:
            self._f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            # The image is saved; the next run finds it by its recorded batch job and records it (_already_saved).
            raise OutputError(f"{self.path}: cannot record {file} in the batch manifest: {io_problem(e)}, then run "
                              "the same command to resume") from None
        return record

    def close(self) -> None:
        self._f.close()
        self._lock.release()

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


# ---------------------------------------------------------------------------------------------------------------------
# Running a batch


@dataclass
class BatchPlan:
    id: str  # this file with these batch-wide flags (recorded in each image)
    lines: dict[int, tuple]  # line number -> (settings, preset, model) of every good line
    jobs: list[Task]  # this rank's, not yet done
    done: int  # images of this batch already made by an earlier run: reused, not made again
    failures: dict[int, str]  # line number -> one-line reason
    planner: object  # the jobs.Planner that resolved the lines, reused for their files
    manifest: str = NEW_MANIFEST  # the manifests' name: NEW_MANIFEST, or an earlier version's batch id
    prompts: dict[int, list[str]] = field(default_factory=dict)  # --combinatorial: every prompt of each line


def plan(text: str, load, flags: GenParams, *, preset: str | None = None, no_stack: bool = False,
         out_dir: str | os.PathLike = "outputs", rank: int = 0, world: int = 1,
         base_dir: str | os.PathLike | None = None) -> BatchPlan:
    """Every line resolved (batch flags < line overrides; a bad line fails alone) and this rank's jobs planned.

    Input files named on a line are relative to `base_dir` (the prompt file's folder), those of `flags` to the current
    folder."""
    from rdbt_cli.jobs import Planner, anchor_files
    from rdbt_cli.settings import layer

    lines = parse_batch(text)
    flags = anchor_files(flags, Path.cwd())
    wide = [vars(flags), preset, load.model, load.text_encoder, load.vae, load.dtype, no_stack]
    bid = batch_id(text + "\0" + json.dumps(wide, default=str, sort_keys=True))
    # An unfinished batch of an earlier version resumes as it began: its seeds and job keys came from the whole file.
    legacy = bool(load_done(out_dir, bid))
    repeats: dict[str, int] = {}
    failures = {line.lineno: line.error for line in lines if line.error}
    planner = Planner(load, no_stack=no_stack)
    resolved, combos = {}, {}
    for line in lines:
        if line.error:
            continue
        try:
            overrides = anchor_files(line.overrides, Path(base_dir) if base_dir is not None else Path.cwd())
            g, p, m = planner.settings(layer(flags, overrides), line.preset or preset, model_flag=load.model)
            planner.wildcards().check(g.prompt)  # a missing wildcard file fails its line before anything loads
            planner.wildcards().check(g.negative or "", "negative prompt")
            if g.combinatorial:
                combos[line.lineno] = planner.wildcards().combinations(g.prompt)
        except RdbtError as err:
            failures[line.lineno] = f"line {line.lineno}: {err}"
            continue
        occurrence = repeats[line.prompt] = repeats.get(line.prompt, -1) + 1
        if g.seed is None:
            g.seed = line_seed(bid, line.lineno) if legacy else text_seed(line.prompt, occurrence)
        resolved[line.lineno] = (g, p, m)
    good = [line for line in lines if line.lineno in resolved]
    manifest = bid if legacy else NEW_MANIFEST
    done = load_done(out_dir, manifest)
    identities = None if legacy else {ln: job_identity(g, m, load) for ln, (g, p, m) in resolved.items()}
    counts = {ln: images_of(r[0].seed, r[0].count) * len(combos.get(ln, [None])) for ln, r in resolved.items()}
    every = {job.key for job in plan_jobs(good, counts, identities=identities)}  # all ranks' jobs
    jobs = plan_jobs(good, counts, rank, world, done, identities)
    return BatchPlan(bid, resolved, jobs, len(every & done.keys()), failures, planner, manifest, combos)


def _already_saved(path: Path, job_key: str) -> bool:
    from rdbt_cli import metadata

    if not path.exists():
        return False
    try:
        batch_rec = metadata.read_png(path)["recipe"].get("batch") or {}
    except RdbtError:
        return False
    return batch_rec.get("job") == job_key  # the key says what made the image, whichever run of the batch it was


def run(bp: BatchPlan, out_dir: str | os.PathLike, rank: int = 0, *, allow_unmatched: bool = False,
        on_image=None, callback=None, on_warning=None, name=None, server=None, previews: bool = False):
    """Make this rank's jobs; yields (path, runner.Made) after each image and its manifest line are written.

    `name(job, default_stem, dit=..., line=...)` gives an image's file stem (--name); by default L<line>-<index>-<seed>.

    `server` is client.runner's (None: a running server that fits, False: none, or a URL). One model per batch
    process: the first job's. Lines that resolve to another file fail with that reason, as do
    lines whose LoRAs are missing or do not fit; the rest go on.
    """
    from rdbt_cli import client, metadata

    if not bp.jobs:
        return
    out_dir = Path(out_dir)
    planner = bp.planner
    model = bp.lines[bp.jobs[0].lineno][2]
    paths = planner.paths(model)
    loaded = planner.identity(model)
    load = replace(planner.load, model=model)
    runner = client.runner(server, load, paths, allow_unmatched=allow_unmatched, callback=callback, previews=previews,
                           on_warning=lambda w: on_warning and on_warning(f"line {current.lineno}: {w}"))
    with Manifest(out_dir, bp.manifest, rank) as manifest:
        for current in bp.jobs:
            ln = current.lineno
            if ln in bp.failures:
                continue
            g, p, wanted = bp.lines[ln]
            # With --combinatorial a line's images are its seeds' images for each prompt in turn.
            k, i = divmod(current.index, images_of(g.seed, g.count))
            seed = seed_at(g.seed, g.count, i) % 2**64
            prompt = bp.prompts[ln][k] if ln in bp.prompts else None
            stem = f"L{ln:04d}-{current.index:03d}-{seed}"
            try:
                if planner.identity(wanted) != loaded:
                    raise ConfigError(f"it asks for model {wanted or 'the default model'!r} but this batch runs "
                                      f"{Path(paths.dit).name!r}; put those lines in their own batch")
                job = planner.job(g, seed, current.index, paths, p, wanted, prompt=prompt,
                                  batch={"id": bp.id, "line": ln, "job": current.key})
                if name is not None:
                    stem = name(job, stem, dit=paths.dit, line=ln)
                if _already_saved(out_dir / f"{stem}.png", current.key):
                    # Killed after the PNG was written but before its manifest line: record it, do not make it twice.
                    manifest.add(current, f"{stem}.png", seed)
                    continue
                if on_image:
                    on_image(f"line {ln} #{current.index + 1} seed {seed}", job.steps)
                made = runner.run(job, callback)
                if callback:
                    callback({"stage": "save"})
                path = metadata.save_png(made.image, out_dir, made.recipe, stem=stem)
            except RdbtError as err:
                bp.failures[ln] = f"line {ln}: {err}"
                continue
            manifest.add(current, Path(path).name, seed)
            yield path, made


def gather(rank: int, world: int, made: int, failures: dict[int, str], elapsed: float):
    """(images made, failures, wall seconds) over all ranks; every rank gets the totals (torch.distributed)."""
    results = [(made, failures, elapsed)]
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        results = [None] * world
        dist.all_gather_object(results, (made, failures, elapsed))
        dist.destroy_process_group()
    all_failures: dict[int, str] = {}
    for r in results:
        all_failures.update(r[1])
    return sum(r[0] for r in results), all_failures, max(r[2] for r in results)
