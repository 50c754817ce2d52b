import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip with the reason when it is absent (a user's fresh clone has no ../shared)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} is not present (only CI and developers have ../shared)")
    return p


_LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Tests never touch the network: a name lookup or connection beyond this machine fails at once, as offline.
    import socket

    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def local_lookup(host, *args, **kwargs):
        if (host.decode() if isinstance(host, bytes) else str(host or "")) not in _LOCAL:
            raise socket.gaierror(socket.EAI_NONAME, "tests must not touch the network")
        return lookup(host, *args, **kwargs)

    def local_connect(sock, address):
        if isinstance(address, tuple) and address[0] not in _LOCAL:
            raise OSError(101, "tests must not touch the network")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", local_lookup)
    monkeypatch.setattr(socket.socket, "connect", local_connect)


@pytest.fixture
def fake_hub(monkeypatch):
    """Downloads with the HTTP layer mocked: hf_hub_download writes "repo/file" into the file it fetches, and the
    network probe passes. Gives the calls made and the real probe."""
    from types import SimpleNamespace

    hub = pytest.importorskip("huggingface_hub")
    from rdbt_cli import discovery

    state = SimpleNamespace(calls=[], check_network=discovery.check_network)

    def fake(repo_id, filename, local_dir, **kw):
        state.calls.append((repo_id, filename))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"{repo_id}/{filename}")
        return str(out)

    monkeypatch.setattr(hub, "hf_hub_download", fake)
    monkeypatch.setattr(discovery, "check_network", lambda: None)
    return state


@pytest.fixture(autouse=True)
def _isolated_user_state(tmp_path_factory, monkeypatch):
    # One env var relocates all user state (presets, LoRA stack, caches), so tests never touch the real home.
    home = tmp_path_factory.mktemp("rdbt_home")
    monkeypatch.setenv("RDBT_HOME", str(home))
    monkeypatch.delenv("RDBT_MODELS", raising=False)
    yield


# ---------------------------------------------------------------------------------------------------------------------
# Processes a test starts. torchrun starts each worker in a session of its own (torch.distributed.elastic), so killing
# torchrun's process group leaves the workers behind, re-parented to init, where they wait forever for a rendezvous
# store that died with torchrun. `spawn` marks every process it starts with an environment variable that children
# inherit, and at the end kills every process that carries the mark, wherever it moved.

_MARK = "RDBT_TEST_SPAWN"


def _proc_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()] if os.path.isdir("/proc") else []


def marked(token: str) -> list[int]:
    """Every running process started under `token`, by the variable its environment inherited (Linux /proc)."""
    needle = f"{_MARK}={token}".encode()
    found = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and alive(pid):
                    found.append(pid)
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class Spawned:
    """Starts processes in sessions of their own, marked; `kill` and the teardown SIGKILL every marked process."""

    def __init__(self):
        self.token = f"{os.getpid()}-{time.monotonic_ns()}"
        self.procs: list[subprocess.Popen] = []

    def popen(self, cmd, env=None, **kw) -> subprocess.Popen:
        env = {**(os.environ if env is None else env), _MARK: self.token}
        proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, env=env, **kw)
        self.procs.append(proc)
        return proc

    def run(self, cmd, *, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        """subprocess.run(capture_output=True, text=True), but a timeout kills the whole tree, not just the root."""
        proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill(self, timeout: float = 30.0) -> list[int]:
        """SIGKILL every process started here and all their descendants (the roots' process groups first, stopped so
        that nothing can start a replacement); waits until they are gone and returns the pids that were running."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    pass
        pids = marked(self.token)
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids


@pytest.fixture
def spawn():
    spawned = Spawned()
    yield spawned
    spawned.kill()
    assert not marked(spawned.token), "processes the test started survived SIGKILL"


@pytest.fixture(scope="session")
def _tiny_models(tmp_path_factory):
    from rdbt_cli.tiny import TINY_VERSION, ensure_tiny_models

    root = tmp_path_factory.mktemp("tiny") / f"tiny-v{TINY_VERSION}"
    ensure_tiny_models(root)
    return root


@pytest.fixture
def shared_tiny(_tiny_models):
    """The embedded tiny model built once per test session (3.5 s a build) instead of once per RDBT_HOME: linked into
    the test's RDBT_HOME, and into `link_into(home)` for a home the test sets itself."""

    def link_into(home):
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        if not (home / _tiny_models.name).exists():
            (home / _tiny_models.name).symlink_to(_tiny_models, target_is_directory=True)
        return home

    link_into(os.environ["RDBT_HOME"])
    return link_into
