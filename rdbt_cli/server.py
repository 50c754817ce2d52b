"""`rdbt serve`: the models loaded once, one generation at a time from a bounded queue, over HTTP.

Two APIs on one FastAPI app: the subset of A1111's `/sdapi/v1` that clients call (a1111.py maps its JSON), and rdbt's
own `/rdbt/v1` (the job table's fields as JSON in, PNG bytes with the full recipe out, progress as Server-Sent
Events), which `rdbt gen` and `rdbt batch` use through client.py.

One worker thread owns the `runner.Runner`; request handlers only plan (every value checked by the settings table,
names resolved by discovery, never paths from the client), queue, and wait. A job's progress callback is where
cancelling happens: `/interrupt`, a client that went away and SIGTERM set a flag that the next step turns into
`sampling.Cancelled`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdbt_cli import a1111, client, discovery, jobs, metadata, settings
from rdbt_cli.config import LoadParams, LoraSpec
from rdbt_cli.errors import ConfigError, RdbtError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: a server is shared, so one request must not hold it for hours or fill memory."""

    max_pixels: int = 2048 * 2048  # per image, after the hires pass
    max_steps: int = 200  # sampler steps per image, both passes
    max_count: int = 16  # images per request
    max_body: int = 64 << 20  # bytes of request body (two base64 images of a few megapixels)
    queue: int = 16  # requests that may wait; more get 503


class HTTPProblem(Exception):
    def __init__(self, status: int, detail: str, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


@dataclass
class Item:
    """One request's work: its jobs (or a model to switch to), its events and its result."""

    jobs: list
    load: LoadParams
    paths: object
    allow_unmatched: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    listeners: list = field(default_factory=list)  # (loop, asyncio.Queue, wants previews) of an SSE response
    results: list = field(default_factory=list)  # (png bytes, recipe, timings)
    interrupted: bool = False
    warnings: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(j.steps for j in self.jobs)


def _post(listeners: list, event: dict) -> None:
    for loop, q, _ in list(listeners):
        try:
            loop.call_soon_threadsafe(_put, q, event)
        except RuntimeError:  # that response's loop has closed
            pass


def _put(q: asyncio.Queue, event: dict) -> None:
    if not q.full():
        q.put_nowait(event)


def preview_png(latent, size: tuple[int, int] | None = None) -> bytes:
    """A latent mid-sampling as a small PNG (preview.py's latent->RGB, no VAE decode), scaled to `size`."""
    from PIL import Image

    from rdbt_cli import preview

    image = Image.fromarray(preview.latent_rgb(latent))
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


class Service:
    """The loaded models, the queue and the worker thread; everything the routes share."""

    def __init__(self, load: LoadParams, *, preset: Optional[str] = None, limits: Limits = Limits(),
                 log=lambda message: print(message, file=sys.stderr, flush=True)):
        self.load, self.preset, self.limits, self.log = load, preset, limits, log
        self.queue: queue.Queue = queue.Queue(maxsize=limits.queue)
        self.inputs = Path(tempfile.mkdtemp(prefix="rdbt-serve-"))  # init images and masks, as bytes arrived
        self.runner = None
        self.loaded: Optional[str] = None  # the loaded model's identity (a real path, or "tiny")
        self.paths = None
        self.current: Optional[Item] = None
        self.state: dict = {}
        self.latent = None
        self.listeners: list = []  # every /rdbt/v1/events stream
        self.draining = False
        self.started = time.time()
        self.made = 0  # images made since the start
        self.thread = threading.Thread(target=self._work, name="rdbt-worker", daemon=True)

    # -- planning (request threads) ---------------------------------------------------------------------------------

    def models_dirs(self) -> list[Path]:
        try:
            return list(discovery.models_dirs(self.load.models_dir))
        except RdbtError:  # no models folder at all (the tiny model): nothing a client can name
            return []

    def model_names(self) -> dict[str, Path]:
        """DiT files a client may name, by the names discovery gives them (and their stems)."""
        found = discovery.kind_files("dit", self.models_dirs())
        return {**{f.stem: f for f, _ in found}, **{name: f for f, name in found}}

    def lora_names(self, dit=None) -> dict[str, Path]:
        """LoRA files a client may name: those in the loras folders, by their name inside the folder and stem."""
        names: dict[str, Path] = {}
        try:
            dirs = jobs.Planner(self.load).lora_dirs(dit)
        except RdbtError:
            dirs = []
        for d in dirs:
            if d.is_dir():
                for f in sorted(d.rglob("*.safetensors")):
                    names.setdefault(f.relative_to(d).with_suffix("").as_posix(), f)
                    names.setdefault(f.stem, f)
        return names

    def model_name(self) -> str:
        if self.load.model == jobs.TINY:
            return jobs.TINY
        return Path(self.paths.dit).stem if self.paths else str(self.load.model or "")

    def _model(self, name: Optional[str]) -> Optional[str]:
        """The load's model for a name a client gave: the loaded one, "tiny", or a name discovery lists."""
        if name is None or name in ("", self.model_name(), self.load.model):
            return self.load.model
        if name == jobs.TINY:
            return jobs.TINY
        known = self.model_names()
        hit = known.get(name) or known.get(name.rsplit(".", 1)[0]) or known.get(name.split(" [")[0])
        if hit is None:
            raise ConfigError(f"model {name!r} is not in the models folder; GET /sdapi/v1/sd-models lists them")
        return str(hit)

    def _input(self, data: Optional[bytes], invert: bool = False) -> Optional[str]:
        """An uploaded image as a file of the server's own, named by its content."""
        if data is None:
            return None
        if invert:
            from PIL import Image, ImageOps

            out = io.BytesIO()
            ImageOps.invert(Image.open(io.BytesIO(data)).convert("RGB")).save(out, format="PNG")
            data = out.getvalue()
        path = self.inputs / f"{hashlib.sha256(data).hexdigest()}.img"
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)

    def plan(self, values: dict, *, loras=(), model=None, init_image=None, mask=None, invert_mask=False,
             index=None, allow_unmatched=False, resolved=False) -> Item:
        """Check a request and resolve it to jobs (ConfigError on any problem: a 422). The server's preset goes under
        the request's values unless they are `resolved` already (a gen or batch client resolved its own)."""
        prompt = values.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("prompt: give a prompt (the text of the picture)")
        wanted = self._model(model)
        load = replace(self.load, model=wanted)
        known = self.lora_names(self.paths.dit if wanted == self.load.model and self.paths else None)
        files = []
        for spec in loras:
            if not isinstance(spec.name, str) or spec.name not in known:
                raise ConfigError(f"LoRA {spec.name!r} is not in the loras folder; GET /sdapi/v1/loras lists them "
                                  "(names only, never paths)")
            files.append(LoraSpec(str(known[spec.name]), spec.weight))
        values = {**values, "loras": files, "init_image": self._input(init_image),
                  "mask": self._input(mask, invert_mask)}
        flags = a1111.check({k: v for k, v in values.items() if v is not None})
        planned, load, paths = jobs.plan(prompt, load, flags, preset=None if resolved else self.preset, no_stack=True)
        lim = self.limits
        if len(planned) > lim.max_count:
            raise ConfigError(f"{len(planned)} images in one request; this server makes at most {lim.max_count}")
        for job in planned:
            g = job.settings
            w, h = settings.hires_size(g.width, g.height, g.hires) if g.hires else (g.width, g.height)
            if w * h > lim.max_pixels:
                raise ConfigError(f"{w}x{h} is more than this server's {lim.max_pixels / 1e6:.1f} megapixels")
            if job.steps > lim.max_steps:
                raise ConfigError(f"{job.steps} steps is more than this server's {lim.max_steps} per image")
        if index is not None:
            if not settings.is_int(index) or index < 0:
                raise ConfigError(f"index must be a whole number of at least 0, not {index!r}")
            planned[0].index = index
        return Item(planned, load, paths, allow_unmatched=bool(allow_unmatched))

    def submit(self, item: Item) -> Item:
        if self.draining:
            raise HTTPProblem(503, "the server is shutting down", {"Retry-After": "5"})
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            raise HTTPProblem(503, f"the queue is full ({self.limits.queue} requests wait); try again shortly",
                              {"Retry-After": str(max(1, int(self.state.get("eta") or 5)))}) from None
        return item

    # -- the worker -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the default model, then start the worker."""
        _, load, paths = jobs.plan("warm-up", self.load, preset=self.preset, no_stack=True)  # the preset's model
        self._switch(load, paths)
        self.thread.start()

    def _switch(self, load: LoadParams, paths) -> None:
        from rdbt_cli.runner import Runner

        identity = jobs.Planner(load).identity(load.model)
        if identity == self.loaded:
            return
        self.log(f"loading {Path(paths.dit).name if load.model != jobs.TINY else 'the tiny model'} ...")
        self.runner, self.loaded = None, None  # the old weights go before the new ones load (or fail to)
        t = time.perf_counter()
        self.runner = Runner(load, paths, on_warning=lambda w: self.log(f"warning: {w}"))
        self.loaded, self.paths, self.load = identity, paths, replace(self.load, model=load.model)
        self.log(f"loaded in {time.perf_counter() - t:.1f} s")

    def _event(self, item: Item, event: dict) -> None:
        _post(item.listeners, event)
        _post(self.listeners, event)

    def _callback(self, item: Item):
        from rdbt_cli import sampling

        def callback(info: dict) -> None:
            if "stage" in info:
                self.state["stage"] = info["stage"]
                self._event(item, {k: v for k, v in info.items() if isinstance(v, (str, int, float, list))})
                return
            if item.cancel.is_set():
                raise sampling.Cancelled()
            s = self.state
            s["step"] += 1
            s.setdefault("first_step", time.perf_counter())
            done = s["step"] / max(1, s["steps"])
            elapsed = time.perf_counter() - s["first_step"]
            s["eta"] = elapsed / max(1, s["step"] - 1) * (s["steps"] - s["step"]) if s["step"] > 1 else None
            self.latent = info.get("denoised")
            event = {"step": s["step"], "steps": s["steps"], "progress": round(done, 4),
                     "eta": None if s["eta"] is None else round(s["eta"], 2)}
            if self.latent is not None and any(want for _, _, want in [*item.listeners, *self.listeners]):
                event["preview"] = base64.b64encode(preview_png(self.latent)).decode("ascii")
            self._event(item, event)

        return callback

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._run(item)

    def _run(self, item: Item) -> None:
        from rdbt_cli import sampling

        self.current, self.latent = item, None
        self.state = {"step": 0, "steps": item.steps, "image": 0, "images": len(item.jobs), "eta": None,
                      "started": time.time()}
        try:
            if item.cancel.is_set():
                item.interrupted = True
                return
            self._switch(item.load, item.paths)
            if not item.jobs:
                return
            self.runner.allow_unmatched = item.allow_unmatched
            self.runner.on_warning = item.warnings.append
            for n, job in enumerate(item.jobs):
                if item.cancel.is_set():
                    item.interrupted = True
                    break
                self.state["image"] = n + 1
                made = self.runner.run(job, self._callback(item))
                png = metadata.png_bytes(made.image, made.recipe)
                item.results.append((png, made.recipe, made.timings))
                self.made += 1
                self._event(item, {"stage": "image", "seed": job.seed, "index": job.index})
        except sampling.Cancelled:
            item.interrupted = True
        except RdbtError as err:
            item.future.set_exception(HTTPProblem(422, str(err)))
        except Exception as err:  # a bug or an out-of-memory must not take the server down with it
            self.log("".join(traceback.format_exception(err)).rstrip())
            item.future.set_exception(HTTPProblem(500, f"{type(err).__name__}: {err}"))
        finally:
            if self.runner is not None:
                self.runner.on_warning = lambda w: self.log(f"warning: {w}")
            self.current, self.latent = None, None
            self.state = {}
            if not item.future.done():
                item.future.set_result(item)
            _post(item.listeners, None)  # the end of its stream

    def interrupt(self) -> None:
        item = self.current
        if item is not None:
            item.cancel.set()

    def drain(self) -> None:
        """SIGTERM: refuse new work, cancel what waits, and let the current job stop at its next step."""
        self.draining = True
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.cancel.set()
                item.interrupted = True
                item.future.set_result(item)
                _post(item.listeners, None)
        self.interrupt()

    def stop(self) -> None:
        self.drain()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        shutil.rmtree(self.inputs, ignore_errors=True)

    def progress(self, with_image: bool) -> dict:
        """A1111's /progress: how far the current request is, its ETA and a preview."""
        s, item, latent = dict(self.state), self.current, self.latent
        steps = s.get("steps") or 0
        image = None
        if with_image and latent is not None and item is not None:
            g = item.jobs[max(0, s.get("image", 1) - 1)].settings
            scale = min(1.0, 512 / max(g.width, g.height))
            image = base64.b64encode(preview_png(latent, (int(g.width * scale), int(g.height * scale)))).decode()
        return {
            "progress": round(s.get("step", 0) / steps, 4) if steps else 0.0,
            "eta_relative": s.get("eta") or 0.0,
            "state": {"skipped": False, "interrupted": bool(item and item.cancel.is_set()),
                      "job": "txt2img" if item else "", "job_count": self.queue.qsize() + (1 if item else 0),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(s.get("started", 0))),
                      "job_no": max(0, s.get("image", 1) - 1), "sampling_step": s.get("step", 0),
                      "sampling_steps": steps},
            "current_image": image, "textinfo": s.get("stage"),
        }

    def status(self) -> dict:
        return {"rdbt": client.SERVER_VERSION, "pid": os.getpid(), "model": self.model_name(),
                "identity": self.loaded, "text_encoder": str(self.paths.text_encoder) if self.paths else None,
                "vae": str(self.paths.vae) if self.paths else None,
                "load": {k: v for k, v in vars(self.load).items() if k in client.LOAD_FIELDS},
                "dtype": str(self.runner.models.dtype).replace("torch.", "") if self.runner else None,
                "device": self.runner.models.device.type if self.runner else None,
                "busy": self.current is not None, "queued": self.queue.qsize(), "made": self.made,
                "uptime_s": round(time.time() - self.started, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# The app


def _authorized(header: str, x_key: str, key: str) -> bool:
    """`Authorization: Bearer KEY`, HTTP Basic with KEY as the password (A1111's --api-auth, webuiapi's set_auth), or
    `X-API-Key: KEY`; compared in constant time."""
    given = x_key or ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip()).decode("utf-8", "replace").partition(":")[2]
        except ValueError:
            given = ""
    return hmac.compare_digest(given.encode(), key.encode())


def make_app(service: Service, api_key: Optional[str] = None):
    app = FastAPI(title="rdbt", version=client.SERVER_VERSION, docs_url=None, redoc_url=None, openapi_url=None)

    def problem(status: int, detail: str, headers=None) -> JSONResponse:
        kinds = {401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 422: "InvalidRequest",
                 503: "ServiceUnavailable"}
        return JSONResponse({"error": kinds.get(status, "ServerError"), "detail": detail}, status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and not _authorized(request.headers.get("authorization", ""),
                                       request.headers.get("x-api-key", ""), api_key):
            return problem(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           {"WWW-Authenticate": 'Basic realm="rdbt"'})
        length = request.headers.get("content-length")
        if length and (not length.isdigit() or int(length) > service.limits.max_body):
            return problem(413, f"the request body is over {service.limits.max_body >> 20} MB")
        try:
            return await call_next(request)
        except HTTPProblem as err:
            return problem(err.status, err.detail, err.headers)

    @app.exception_handler(HTTPProblem)
    async def on_problem(request, err: HTTPProblem):
        return problem(err.status, err.detail, err.headers)

    @app.exception_handler(RdbtError)
    async def on_rdbt(request, err: RdbtError):
        return problem(422, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, err):
        return problem(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, err):
        return problem(422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors()))

    @app.exception_handler(Exception)
    async def on_bug(request, err):
        service.log("".join(traceback.format_exception(err)).rstrip())
        return problem(500, f"{type(err).__name__}: {err}")

    async def body_json(request: Request):
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > service.limits.max_body:
                raise HTTPProblem(413, f"the request body is over {service.limits.max_body >> 20} MB")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"{}")
        except (ValueError, RecursionError):
            raise HTTPProblem(422, "the request body is not valid JSON") from None

    async def plan(**kw) -> Item:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(lambda: service.plan(**kw))  # reads files: off the event loop

    async def wait(item: Item, request: Request) -> Item:
        """The item's result; a client that goes away cancels its job (queued or running)."""
        done = asyncio.wrap_future(item.future)
        while True:
            finished, _ = await asyncio.wait({done}, timeout=0.2)
            if finished:
                return done.result()
            if await request.is_disconnected():
                item.cancel.set()
                service.log("client went away: its job is cancelled")
                return await done

    # -- A1111 --------------------------------------------------------------------------------------------------------

    async def generate_a1111(request: Request, img2img: bool):
        started = time.time()
        body = await body_json(request)
        req = a1111.parse(body, img2img)
        item = service.submit(await plan(values=req.values, loras=req.loras, model=req.model,
                                         init_image=req.init_image, mask=req.mask, invert_mask=req.invert_mask))
        await wait(item, request)
        pngs = [png for png, _, _ in item.results]
        recipes = [recipe for _, recipe, _ in item.results]
        shown = {k: v for k, v in body.items() if k not in ("init_images", "mask")} if isinstance(body, dict) else {}
        return a1111.response(pngs if req.send_images else [], recipes, shown, service.model_name(), started)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate_a1111(request, False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate_a1111(request, True)

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        names = {jobs.TINY: None} if service.load.model == jobs.TINY else {}
        names |= {name: f for name, f in service.model_names().items() if "/" not in name}
        return [{"title": n, "model_name": n, "hash": discovery.cached_hashes(f)["autov2"] if f and
                 discovery.cached_hashes(f) else None, "sha256": None, "filename": f.name if f else n,
                 "config": None} for n, f in names.items()]

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": n, "alias": n, "path": f.name, "metadata": {}} for n, f in service.lora_names().items()]

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    # What clients list before they offer choices (SillyTavern, Open WebUI): what rdbt has, or nothing.
    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 2}
                for name in ("Latent", "Lanczos")]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": "Latent"}, {"name": "Latent (nearest-exact)"}]

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return []

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return []

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.post("/sdapi/v1/refresh-checkpoints")
    @app.post("/sdapi/v1/refresh-loras")
    def refresh():
        return None  # the listings are read from the folders on every request

    @app.get("/sdapi/v1/options")
    def get_options():
        return {"sd_model_checkpoint": service.model_name(), "samples_format": "png",
                "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await body_json(request)
        name = body.get("sd_model_checkpoint") if isinstance(body, dict) else None
        if name is not None:
            if not isinstance(name, str):
                raise HTTPProblem(422, "sd_model_checkpoint must be a model name")
            from starlette.concurrency import run_in_threadpool

            def switch() -> Item:
                wanted = service._model(name)
                _, load, paths = jobs.plan("switch", replace(service.load, model=wanted), no_stack=True)
                return Item([], load, paths)

            await wait(service.submit(await run_in_threadpool(switch)), request)
        return None

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return service.progress(not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        service.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        service.interrupt()
        return {}

    # -- rdbt's own -------------------------------------------------------------------------------------------------

    @app.get("/rdbt/v1/status")
    def status():
        return service.status()

    @app.post("/rdbt/v1/generate")
    async def generate(request: Request):
        """The job table's fields as JSON; answers the PNG (one image), or Server-Sent Events with `Accept:
        text/event-stream`: stages, steps with ETA (and with ?preview=1 a latent preview PNG), and each image as
        base64 PNG."""
        body = await body_json(request)
        if not isinstance(body, dict):
            raise HTTPProblem(422, "the request body must be a JSON object of settings")
        body = dict(body)
        extra = {k: body.pop(k, None) for k in ("model", "index", "allow_unmatched", "init_image", "mask", "size",
                                                "resolved")}
        specs = body.pop("loras", None) or []
        if not isinstance(specs, list):
            raise HTTPProblem(422, "loras must be a list of \"NAME:WEIGHT\" or {\"name\", \"weight\"}")
        loras = [LoraSpec(s.get("name"), s.get("weight", 1.0)) if isinstance(s, dict) else
                 settings.parse_lora_arg(str(s)) for s in specs]
        unknown = set(body) - set(settings.BY_NAME)
        if unknown:
            raise HTTPProblem(422, f"unknown settings {', '.join(sorted(unknown))}; the fields are the job table's: "
                                   f"{', '.join(settings.BY_NAME)}")
        if extra["size"] is not None:
            body["width"], body["height"] = settings.parse_size(str(extra["size"]))
        stream = "text/event-stream" in request.headers.get("accept", "")
        images = {k: a1111.decode_image(extra[k], k) if extra[k] else None for k in ("init_image", "mask")}
        item = await plan(values=body, loras=loras, model=extra["model"], index=extra["index"],
                          allow_unmatched=extra["allow_unmatched"], resolved=bool(extra["resolved"]), **images)
        if len(item.jobs) > 1 and not stream:
            raise HTTPProblem(422, "count above 1 needs Accept: text/event-stream (each image is an event); or send "
                                   "one request per seed")
        if not stream:
            await wait(service.submit(item), request)
            if not item.results:
                raise HTTPProblem(409, "interrupted before the image was made")
            png, recipe, timings = item.results[0]
            return Response(png, media_type="image/png", headers={
                "X-Rdbt-Seed": str(recipe["seed"]), "X-Rdbt-Timings": json.dumps(timings),
                "X-Rdbt-Warnings": json.dumps(item.warnings)})
        events: asyncio.Queue = asyncio.Queue(maxsize=1000)
        item.listeners.append((asyncio.get_running_loop(), events, request.query_params.get("preview") == "1"))
        service.submit(item)
        return StreamingResponse(_stream(item, events, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _stream(item: Item, events: asyncio.Queue, request: Request):
        sent = 0
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=15)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"  # also how a gone client shows: the write fails
                    continue
                while sent < len(item.results):
                    png, recipe, timings = item.results[sent]
                    sent += 1
                    yield _sse("image", {"png": base64.b64encode(png).decode("ascii"), "seed": recipe["seed"],
                                         "timings": timings, "warnings": item.warnings})
                if event is None:
                    break
                if event.get("stage") != "image":
                    yield _sse("step" if "step" in event else "stage", event)
            exc = item.future.exception() if item.future.done() else None
            if isinstance(exc, HTTPProblem):
                yield _sse("error", {"status": exc.status, "detail": exc.detail})
            yield _sse("done", {"interrupted": item.interrupted, "images": len(item.results)})
        finally:
            if not item.future.done():  # the client closed the stream: its job stops at the next step
                item.cancel.set()
                service.log("client went away: its job is cancelled")

    @app.get("/rdbt/v1/events")
    async def events_stream(request: Request):
        """Every job's progress as Server-Sent Events, for watchers (?preview=1: with a preview PNG per step; the
        job's own stream has its images too)."""
        events: asyncio.Queue = asyncio.Queue(maxsize=1000)
        entry = (asyncio.get_running_loop(), events, request.query_params.get("preview") == "1")
        service.listeners.append(entry)

        async def gen():
            try:
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if event is not None:
                        yield _sse("step" if "step" in event else "stage", event)
            finally:
                service.listeners.remove(entry)

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# Running it


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any weights load, so a taken port is one line at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); another server may be there (rdbt "
                          "serve --status), or pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_exposure(host: str, api_key: Optional[str], insecure: bool) -> None:
    if host not in LOOPBACK and not api_key and not insecure:
        raise ConfigError(f"--host {host} lets other machines generate on this one; give --api-key KEY (or set "
                          "RDBT_API_KEY), or --insecure if the network is yours alone")


def serve(load: LoadParams, *, host: str = "127.0.0.1", port: int = 7860, preset: Optional[str] = None,
          api_key: Optional[str] = None, insecure: bool = False, limits: Limits = Limits()) -> None:
    """Run until SIGTERM or Ctrl-C: the current job is cancelled at its next step, waiting ones get nothing."""
    import uvicorn

    check_exposure(host, api_key, insecure)
    existing = client.find_running()
    if existing is not None:
        raise ConfigError(f"a server already runs at {existing.url} (pid {existing.pid}); stop it with rdbt serve "
                          "--stop, or give this one its own RDBT_HOME")
    sock = bind(host, port)
    service = Service(load, preset=preset, limits=limits)
    service.start()
    port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if host in ("0.0.0.0", "::"):
        url = f"http://127.0.0.1:{port}"

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.drain()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a stop asked for is a clean exit, not a signal to re-raise after it

    config = uvicorn.Config(make_app(service, api_key), log_level="info", timeout_graceful_shutdown=10,
                            access_log=True)
    written = client.write_server_file(url, os.getpid(), api_key)
    service.log(f"rdbt serve: {url} (A1111 API under /sdapi/v1, rdbt's under /rdbt/v1); Ctrl-C or rdbt serve "
                "--stop ends it")
    try:
        Server(config).run(sockets=[sock])
    finally:
        client.remove_server_file(written)
        service.stop()
        sock.close()
