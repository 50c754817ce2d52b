"""The library entry point: load once, merge each job's LoRA stack, make the images, record each recipe.

    from rdbt_cli import LoadParams, plan, run
    jobs, load, paths = plan("1girl, silver hair", LoadParams(model="tiny"))
    for made in run(jobs, load, paths):
        made.image, made.recipe, made.timings    # uint8 HxWx3, the rdbt recipe dict, seconds per phase

`gen` and `batch` (also under torchrun) are thin shells over `Runner`. Never prints: warnings go to `on_warning`,
progress to `callback`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from rdbt_cli import discovery, metadata, pipeline
from rdbt_cli.config import LoadParams, ModelPaths
from rdbt_cli.errors import RdbtError
from rdbt_cli.jobs import TINY, Job

_T_START = time.perf_counter()  # taken at import, i.e. soon after the interpreter started rdbt


class BackgroundHashes:
    """File hashes for the metadata, computed on one background thread from the moment the files are known.

    Hashing a 4 GB model the first time takes seconds (then discovery's cache answers), so it overlaps model loading
    and sampling instead of delaying the first image. One worker, so the hash cache has one writer; a daemon, so an
    error or Ctrl-C exits at once instead of waiting for queued hashes (the cache is written atomically).
    """

    def __init__(self):
        self._queue = None
        self._futures: dict = {}

    def _worker(self):
        while True:
            path, future = self._queue.get()
            try:
                future.set_result(discovery.file_hashes(path))
            except BaseException as exc:  # handed to whoever waits for this hash
                future.set_exception(exc)

    def start(self, *paths) -> None:
        import queue
        import threading
        from concurrent.futures import Future

        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._worker, name="rdbt-hash", daemon=True).start()
        for path in paths:
            key = self._key(path)
            if key not in self._futures:
                self._futures[key] = Future()
                self._queue.put((path, self._futures[key]))

    @staticmethod
    def _key(path):
        try:
            st = os.stat(path)
        except OSError:
            return (str(path), None, None)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)  # a file replaced in between is hashed again

    def ready(self, path) -> bool:
        future = self._futures.get(self._key(path))
        return future is not None and future.done()

    def get(self, path) -> dict:
        self.start(path)
        try:
            return self._futures[self._key(path)].result()
        except (OSError, RdbtError):
            return {}


@dataclass
class Made:
    job: Job
    image: object  # uint8 numpy [H, W, 3]
    recipe: dict
    timings: dict  # seconds per phase; the first image of a Runner also has load_s and start_to_first_step_s


class Runner:
    """Models loaded once for `paths`; `run(job)` switches the LoRA stack by exact undo when it changes."""

    def __init__(self, load: LoadParams, paths: ModelPaths, *, allow_unmatched: bool = False,
                 on_warning: Optional[Callable[[str], None]] = None, callback=None):
        """Loads the models; `callback` hears each file's "load" stage (pipeline.report)."""
        self.load, self.paths = load, paths
        self.allow_unmatched = allow_unmatched
        self.on_warning = on_warning or (lambda message: None)
        self.hashes = BackgroundHashes()
        self.tiny = load.model == TINY
        if not self.tiny:
            self.hashes.start(paths.dit, paths.text_encoder, paths.vae)
        self.dit_format = {} if self.tiny else discovery.format_record(paths.dit)  # GGUF: the recipe says which quant
        self.models = pipeline.Models.load(paths, device=load.device, dtype=load.dtype, low_vram=load.low_vram,
                                           attention=load.attention, compile=load.compile, callback=callback)
        warning = pipeline.dtype_warning(self.models.dtype, self.models.device)
        if warning:
            self.on_warning(warning)
        self._stack: Optional[list] = None
        self._remap: Optional[str] = None  # the --lora-remap the stack was merged with
        self._noted: set = set()
        self._dirs: Optional[list] = None  # the models folders, looked up for the first recipe
        self.made = 0

    def set_loras(self, loras: list, callback=None, remap: str = "refuse") -> None:
        if loras == self._stack and remap == self._remap:
            return
        if loras or self._stack:
            pipeline.report(callback, "lora", files=[Path(p).name for p, _ in loras])
        self._stack = None  # a failed merge leaves no stack we could vouch for
        if not self.tiny:
            self.hashes.start(*(path for path, _ in loras))
        patch = self.models.set_loras(loras, allow_unmatched=self.allow_unmatched, remap=remap)
        for warning in getattr(patch, "warnings", []) or []:
            self.on_warning(warning)
        self._stack, self._remap = list(loras), remap

    def run(self, job: Job, callback=None) -> Made:
        for note in job.notes:  # once per Runner, not once per image of a --count
            if note not in self._noted:
                self._noted.add(note)
                self.on_warning(note)
        self.set_loras(job.loras, callback, job.settings.lora_remap or "refuse")
        result = pipeline.generate(self.models, job.settings, seed=job.seed, index=job.index, callback=callback)
        timings = {k: round(v, 4) for k, v in result.timings.items() if k != "first_step_at"}
        if self.made == 0:
            timings["load_s"] = round(self.models.timings["load_s"], 4)
            timings["start_to_first_step_s"] = round(result.timings["first_step_at"] - _T_START, 4)
        self.made += 1
        return Made(job, result.image, self.recipe(job, callback), timings)

    def comfy_name(self, path, kind: str) -> str:
        """The file's name in ComfyUI's loaders (its path inside the models-type folder), for the graphs."""
        if self._dirs is None:
            try:
                self._dirs = discovery.models_dirs(self.load.models_dir)
            except RdbtError:  # no models folder (the tiny model): the file's own folders tell
                self._dirs = []
        return discovery.comfy_name(path, kind, self._dirs)

    def recipe(self, job: Job, callback=None) -> dict:
        if not self.tiny:
            files = [self.paths.dit, self.paths.text_encoder, self.paths.vae, *(path for path, _ in job.loras)]
            waiting = [Path(f).name for f in files if not self.hashes.ready(f)]
            if waiting:  # the first hash of a large file can outlast the image; it is then cached for good
                pipeline.report(callback, "hash", files=waiting)

        def component(path, kind):
            return metadata.component_record(path, self.hashes.get(path), self.comfy_name(path, kind))

        eng = self.models
        return metadata.make_recipe(
            job.settings, seed=job.seed, index=job.index,
            model=dict(metadata.TINY_COMPONENT) if self.tiny else component(self.paths.dit, "dit") | self.dit_format,
            text_encoder=None if self.tiny else component(self.paths.text_encoder, "te"),
            vae=None if self.tiny else component(self.paths.vae, "vae"),
            loras=[metadata.lora_record(path, weight, self.hashes.get(path), self.comfy_name(path, "lora"))
                   for path, weight in job.loras],
            preset=job.preset, device=eng.device.type, dtype=str(eng.dtype).replace("torch.", ""),
            weights_fp8=eng.weights_fp8, **job.extra,
        )


def run(jobs: Iterable[Job], load: LoadParams, paths: ModelPaths, *, allow_unmatched: bool = False,
        callback=None, on_warning=None) -> Iterator[Made]:
    """Load once, then make every job's image in order."""
    runner = Runner(load, paths, allow_unmatched=allow_unmatched, on_warning=on_warning, callback=callback)
    for job in jobs:
        yield runner.run(job, callback)
