"""`rdbt gen` and `rdbt batch` through a running `rdbt serve`: the same jobs, made by models that are already loaded.

A server announces itself in RDBT_HOME/server.json (its URL, pid and API key, readable by its user only); a file whose
process is gone is ignored. The client plans exactly as in-process (every setting resolved and checked here, seeds
included), sends each job to /rdbt/v1/generate, follows its Server-Sent Events for the progress bar, and hands back the
image and recipe for metadata.save_png to write, so paths, permissions and the never-overwrite rule stay the user's.
A server with other models or another precision is not used: the image would differ from what `gen` alone makes.

stdlib and Pillow only: no torch, no web framework, so a warm `rdbt gen` starts in a fraction of a second.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rdbt_cli import __version__, metadata, settings
from rdbt_cli.config import LoadParams, user_dir
from rdbt_cli.errors import ConfigError, RdbtError

SERVER_VERSION = __version__
SERVER_FILE = "server.json"
LOAD_FIELDS = ("device", "dtype", "low_vram", "attention", "compile")  # how the server's models were loaded
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SENT = {s.name for s in settings.SETTINGS} - {"loras", "init_image", "mask", "count"}


def server_file() -> Path:
    return user_dir() / SERVER_FILE


def write_server_file(url: str, pid: int, api_key: Optional[str]) -> Path:
    """Announce a server; 0600, since it may hold the API key. Written whole or not at all."""
    path = server_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SERVER_FILE}.{pid}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"url": url, "pid": pid, "api_key": api_key, "version": SERVER_VERSION}, f)
    os.replace(tmp, path)
    return path


def remove_server_file(path: Path) -> None:
    """Remove the announcement if it is still this process's (another server may have replaced it)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


@dataclass
class Found:
    url: str
    pid: Optional[int]
    api_key: Optional[str]


def _alive(pid) -> bool:
    if not settings.is_int(pid) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False  # exited, waiting for its parent to notice
    except (OSError, IndexError):
        pass  # no /proc here: ask the kernel below
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process holds that pid: not ours, but alive
    return True


def find_running() -> Optional[Found]:
    """The server announced in RDBT_HOME, or None (no file, a torn file, its process is gone, or the file is another
    user's: whoever can write it decides where the prompts go)."""
    try:
        with open(server_file(), encoding="utf-8") as f:
            if hasattr(os, "getuid") and os.fstat(f.fileno()).st_uid != os.getuid():
                return None
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not _alive(data.get("pid")):
        return None
    return Found(data["url"], data["pid"], data.get("api_key"))


def _request(url: str, key: Optional[str], path: str, body: Optional[dict] = None, *, timeout: float = 5.0,
             stream: bool = False):
    headers = {"Accept": "text/event-stream" if stream else "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    return urllib.request.urlopen(req, timeout=timeout)


KEY_ENV = "RDBT_API_KEY"


def _problem(err: urllib.error.HTTPError, key: Optional[str] = None) -> str:
    if err.code == 401:  # the one answer the user fixes here, not in the request
        return (f"the server refused the API key in ${KEY_ENV}; set it to the key its rdbt serve was given" if key
                else f"the server needs an API key; set ${KEY_ENV} to the key its rdbt serve was given")
    try:
        return json.loads(err.read()).get("detail") or str(err)
    except (ValueError, OSError, AttributeError):
        return str(err)


def status(found: Found) -> dict:
    with _request(found.url, found.api_key, "/rdbt/v1/status", timeout=3.0) as resp:
        return json.loads(resp.read())


def _mismatch(info: dict, load: LoadParams, paths) -> Optional[str]:
    """Why this server would make another image than `gen` in-process would (None when it makes the same)."""
    from rdbt_cli.jobs import TINY

    wanted = TINY if load.model == TINY else os.path.realpath(paths.dit)
    if info.get("identity") != wanted:
        return f"it has model {info.get('model')!r} loaded"
    if load.model != TINY:
        for part in ("text_encoder", "vae"):
            if info.get(part) and os.path.realpath(info[part]) != os.path.realpath(getattr(paths, part)):
                return f"it loaded another {part.replace('_', ' ')}"
    default = LoadParams()
    for name in LOAD_FIELDS:
        mine, theirs = getattr(load, name), (info.get("load") or {}).get(name)
        if mine == getattr(default, name) or mine == theirs:
            continue
        if name == "dtype" and _TORCH_DTYPES.get(mine) == info.get("dtype"):
            continue
        if name == "device" and mine == info.get("device"):
            continue
        return f"it runs with --{name.replace('_', '-')} {theirs}"
    return None


def runner(server, load: LoadParams, paths, *, allow_unmatched: bool = False, on_warning=None, callback=None,
           on_note: Callable[[str], None] = lambda m: None, previews: bool = False):
    """What makes the images of gen and batch: a server's RemoteRunner when one fits (see connect), else a
    runner.Runner with the models loaded here (which imports torch: seconds). `previews`: the callback shows each
    step's picture (a server sends it only when asked; in-process every step carries its latent)."""
    remote = connect(server, load, paths, allow_unmatched=allow_unmatched, on_warning=on_warning, on_note=on_note,
                     previews=previews)
    if remote is not None:
        return remote
    from rdbt_cli.runner import Runner

    return Runner(load, paths, allow_unmatched=allow_unmatched, on_warning=on_warning, callback=callback)


def connect(server, load: LoadParams, paths, *, allow_unmatched: bool = False, on_warning=None,
            on_note: Callable[[str], None] = lambda m: None, previews: bool = False):
    """A RemoteRunner for a server that makes what `load` and `paths` would, else None (run in-process).

    `server`: None finds one through RDBT_HOME; False (--no-server) never uses one; a URL (--server) must work.

    The API key: the announced server's own (its file is readable by its user only); for any other --server URL,
    $RDBT_API_KEY. There is no option for it: every user of the machine can read a command's arguments."""
    if server is False:
        return None
    if server:
        found = find_running()
        key = found.api_key if found and found.url.rstrip("/") == server.rstrip("/") else None
        found = Found(server, None, key or os.environ.get(KEY_ENV) or None)
    else:
        found = find_running()
        if found is None:
            return None
    try:
        info = status(found)
    except urllib.error.HTTPError as err:
        if server:
            raise ConfigError(f"--server {server}: {_problem(err, found.api_key)}") from None
        on_note(f"the running server is not used ({_problem(err, found.api_key)}); making the image here")
        return None
    except (OSError, ValueError) as err:
        if server:
            raise ConfigError(f"--server {server}: no rdbt server answers there ({getattr(err, 'reason', err)}); "
                              "start one with rdbt serve, or leave out --server") from None
        return None  # announced but not answering (still loading, or stuck): in-process is as fast as waiting
    why = _mismatch(info, load, paths)
    if why:
        if server:
            raise ConfigError(f"--server {server}: {why}, which would make another image; use --no-server")
        on_note(f"the running server is not used ({why}); making the image here")
        return None
    return RemoteRunner(found, load, paths, on_warning or (lambda m: None), allow_unmatched, previews)


@dataclass
class Made:
    """What runner.Made carries that gen and batch use: the image (a PIL image), its recipe and timings."""

    job: object
    image: object
    recipe: dict
    timings: dict


class RemoteRunner:
    """runner.Runner's `run(job, callback)` over HTTP."""

    def __init__(self, found: Found, load: LoadParams, paths, on_warning, allow_unmatched: bool = False,
                 previews: bool = False):
        from rdbt_cli.jobs import Planner

        self.found, self.on_warning, self.allow_unmatched, self.previews = found, on_warning, allow_unmatched, previews
        self.noted: set = set()
        self.lora_dirs = Planner(load).lora_dirs(paths.dit)
        self.url = found.url

    def _lora_name(self, path) -> str:
        """The name the server knows a LoRA file by: its path inside a loras folder, without .safetensors."""
        real = Path(os.path.realpath(path))
        for d in self.lora_dirs:
            try:
                return real.relative_to(os.path.realpath(d)).with_suffix("").as_posix()
            except ValueError:
                continue
        raise ConfigError(f"LoRA {path} is outside the loras folders, and a server loads LoRAs only by name; put it "
                          "in a loras folder or use --no-server")

    def body(self, job) -> dict:
        g = job.settings
        body = {name: getattr(g, name) for name in _SENT if getattr(g, name) is not None}
        body.update(seed=job.seed, index=job.index, count=1, allow_unmatched=self.allow_unmatched, resolved=True,
                    loras=[{"name": self._lora_name(p), "weight": w} for p, w in job.loras])
        for name in ("init_image", "mask"):
            if getattr(g, name):
                body[name] = base64.b64encode(Path(getattr(g, name)).read_bytes()).decode("ascii")
        return body

    def run(self, job, callback=None) -> Made:
        for note in job.notes:  # once per run, as runner.Runner says them
            if note not in self.noted:
                self.noted.add(note)
                self.on_warning(note)
        try:
            resp = _request(self.url, self.found.api_key, "/rdbt/v1/generate" + ("?preview=1" if self.previews else ""),
                            self.body(job), timeout=120, stream=True)
        except urllib.error.HTTPError as err:
            raise ConfigError(f"server {self.url}: {_problem(err, self.found.api_key)}") from None
        except OSError as err:
            raise RdbtError(f"server {self.url} stopped answering ({getattr(err, 'reason', err)}); run again, or "
                            "with --no-server") from None
        image = None
        with resp:
            for kind, data in _events(resp):
                if kind == "stage" and callback is not None:
                    callback(data)
                elif kind == "step" and callback is not None:
                    step = {"i": data["step"] - 1}
                    if data.get("preview"):  # the latent's picture, as the in-process preview draws it
                        step["preview_png"] = base64.b64decode(data["preview"])
                    callback(step)
                elif kind == "image":
                    image = data
                elif kind == "error":
                    raise ConfigError(f"server {self.url}: {data.get('detail')}")
        if image is None:
            raise RdbtError(f"server {self.url}: the job was cancelled (the server is stopping or was interrupted)")
        for warning in image.get("warnings") or []:
            self.on_warning(warning)
        return self._made(job, base64.b64decode(image["png"]), image.get("timings") or {})

    @staticmethod
    def _made(job, png: bytes, timings: dict) -> Made:
        from PIL import Image

        im = Image.open(io.BytesIO(png))
        im.load()
        recipe = json.loads(im.text["rdbt"])
        # What only this side knows: the preset's name, a batch's record, and the input files as the user has them.
        recipe.update(preset=job.preset, **job.extra)
        for name in ("init_image", "mask"):
            if getattr(job.settings, name):
                recipe[name] = metadata.input_record(getattr(job.settings, name))
        return Made(job, im.convert("RGB"), recipe, timings)


def _events(resp):
    """(event, data) pairs of a Server-Sent Events response."""
    kind, data = "message", []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


# ---------------------------------------------------------------------------------------------------------------------
# rdbt serve --status / --stop


def describe() -> str:
    found = find_running()
    if found is None:
        return "no rdbt server runs for this RDBT_HOME (start one with: rdbt serve)"
    try:
        info = status(found)
    except (OSError, ValueError) as err:
        return f"a server is announced at {found.url} (pid {found.pid}) but does not answer ({err})"
    return (f"{found.url}  pid {info['pid']}  model {info['model']} ({info['device']}, {info['dtype']})  "
            f"{'busy' if info['busy'] else 'idle'}, {info['queued']} waiting, up {info['uptime_s']:.0f} s")


def stop(timeout: float = 60.0) -> str:
    """SIGTERM to the announced server, then wait for it to exit (a CPU step or decode of the full model, which
    cannot stop midway, can take tens of seconds)."""
    import signal
    import time

    found = find_running()
    if found is None:
        return "no rdbt server runs for this RDBT_HOME"
    try:
        info = status(found)
    except (OSError, ValueError):
        info = {}
    if info.get("pid") != found.pid:
        raise ConfigError(f"pid {found.pid} in {server_file()} does not answer as an rdbt server; not stopping it "
                          "(remove the file if the server is gone)")
    os.kill(found.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(found.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(found.pid):
        raise RdbtError(f"the server (pid {found.pid}) has not exited after {timeout:.0f} s")
    return f"stopped the server at {found.url} (pid {found.pid})"
