"""`rdbt serve` over real HTTP on localhost: the A1111 API driven by `webuiapi` (an A1111 client nobody here wrote),
rdbt's own API and its event stream, `rdbt gen`/`batch` through the server (torch-free, the same images as
in-process), concurrency, bad requests, cancelling, auth, and a clean stop on SIGTERM.

One server (the tiny model, CPU) serves the whole module; it is stopped by the last test and killed in teardown.
"""

import base64
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from rdbt_cli import client  # noqa: E402
from rdbt_cli.cli import app  # noqa: E402

SMALL = {"steps": 2, "width": 64, "height": 64}


def _write_lora(path: Path) -> None:
    # A LoRA on the tiny DiT's first MLP layer (128 -> 512), strong enough to change the picture.
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.mlp.layer1.lora_down.weight": rng.standard_normal((4, 128), np.float32),
               "diffusion_model.blocks.0.mlp.layer1.lora_up.weight": rng.standard_normal((512, 4), np.float32)},
              str(path))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import Spawned

    home = tmp_path_factory.mktemp("serve_home")
    models = tmp_path_factory.mktemp("serve_models")
    _write_lora(models / "loras" / "style.safetensors")
    from safetensors.numpy import save_file

    save_file({"lora_unet_down_blocks_0.lora_down.weight": np.zeros((4, 8), np.float32),  # an SDXL LoRA: fits nothing
               "lora_unet_down_blocks_0.lora_up.weight": np.zeros((8, 4), np.float32)},
              str(models / "loras" / "sdxl.safetensors"))
    env = {**os.environ, "RDBT_HOME": str(home)}
    env.pop("RDBT_MODELS", None)
    spawned = Spawned()
    log = open(home / "serve.log", "w+")
    proc = spawned.popen([sys.executable, "-m", "rdbt_cli", "serve", "--model", "tiny", "--device", "cpu",
                          "--port", "0", "--models-dir", models, "--queue", "16"], env=env, stdout=log, stderr=log)
    announced = home / client.SERVER_FILE
    deadline = time.monotonic() + 180
    while not announced.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            spawned.kill()
            pytest.fail(f"rdbt serve did not start:\n{log.read()}")
        time.sleep(0.1)
    url = json.loads(announced.read_text())["url"]
    try:
        yield type("Served", (), {"url": url, "port": int(url.rsplit(":", 1)[1]), "home": home, "models": models,
                                  "proc": proc, "log": log})
    finally:
        spawned.kill()
        log.close()


@pytest.fixture
def at_home(served, monkeypatch):
    monkeypatch.setenv("RDBT_HOME", str(served.home))
    return served


def _call(served, path, body=None, *, headers=None, raw=None, method=None):
    """(status, headers, body bytes) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(served.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def _status(served) -> dict:
    return json.loads(_call(served, "/rdbt/v1/status")[2])


def _recipe(image) -> dict:
    return json.loads(image.info["rdbt"])


def test_webuiapi_txt2img_batch_with_lora_tag_and_a1111_names(served):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=served.port)
    result = api.txt2img(prompt="a cat, <lora:style:0.5>", negative_prompt="blurry", seed=11, batch_size=2,
                         sampler_name="Euler a", scheduler="Karras", cfg_scale=3, **SMALL)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["seed"] == 11 and result.info["all_seeds"] == [11, 12]
    first = _recipe(result.images[0])
    assert (first["prompt"], first["negative"], first["seed"], first["steps"], first["cfg"]) == \
        ("a cat,", "blurry", 11, 2, 3.0)
    assert (first["sampler"], first["scheduler"]) == ("euler_ancestral", "karras")
    assert [(lo["name"], lo["weight"]) for lo in first["loras"]] == [("style", 0.5)]
    infotext = result.info["infotexts"][0]
    assert infotext == result.images[0].info["parameters"]
    assert "Sampler: Euler a" in infotext and "Schedule type: Karras" in infotext and "<lora:style:0.5>" in infotext
    plain = api.txt2img(prompt="a cat,", negative_prompt="blurry", seed=11, sampler_name="Euler a",
                        scheduler="Karras", cfg_scale=3, **SMALL)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))  # the LoRA was applied
    again = api.txt2img(prompt="a cat, <lora:style:0.5>", negative_prompt="blurry", seed=11, sampler_name="Euler a",
                        scheduler="Karras", cfg_scale=3, **SMALL)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))  # exact undo, then again


def test_webuiapi_img2img_inpaint_and_hires(served):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=served.port)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (16, 16, 48, 48))
    out = api.img2img(images=[init], mask_image=mask, prompt="a dog", seed=3, denoising_strength=0.5,
                      inpainting_fill=1, **SMALL)
    r = _recipe(out.images[0])
    assert r["denoise"] == 0.5 and r["inpaint"] == "blend" and r["init_image"]["width"] == 64 and r["mask"]
    inverted = api.img2img(images=[init], mask_image=mask, prompt="a dog", seed=3, denoising_strength=0.5,
                           inpainting_fill=1, inpainting_mask_invert=1, **SMALL)
    assert _recipe(inverted.images[0])["mask"]["sha256"] != r["mask"]["sha256"]  # the mask arrived, inverted
    assert not np.array_equal(np.asarray(inverted.images[0]), np.asarray(out.images[0]))
    hires = api.txt2img(prompt="a cat", seed=4, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1,
                        denoising_strength=0.6, **SMALL)
    r = _recipe(hires.images[0])
    assert hires.images[0].size == (96, 96) and (r["hires"], r["hires_steps"], r["hires_denoise"]) == (1.5, 1, 0.6)


def test_listings_options_progress_and_interrupt(served):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=served.port)
    assert "Euler a" in api.util_get_sampler_names() and "er_sde" in api.util_get_sampler_names()
    assert "Karras" in [s["label"] for s in api.get_schedulers()]
    assert [m["title"] for m in api.get_sd_models()] == ["tiny"]
    assert sorted(lo["name"] for lo in api.get_loras()) == ["sdxl", "style"]
    assert all("/" not in lo["path"] for lo in api.get_loras())  # names, never the server's paths
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    assert [u["name"] for u in api.get_upscalers()] == ["Latent", "Lanczos"] and api.get_sd_vae() == []
    assert _call(served, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny"})[0] == 200
    assert _call(served, "/sdapi/v1/options", {"sd_model_checkpoint": "../../etc/passwd"})[0] == 422

    made = {}
    worker = threading.Thread(target=lambda: made.setdefault("r", api.txt2img(prompt="slow", seed=1, steps=200,
                                                                             width=128, height=128)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        progress = api.get_progress()
        while progress["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            progress = api.get_progress()
        assert progress["state"]["sampling_steps"] == 200 and 0 < progress["progress"] < 1
        assert progress["current_image"] and Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        api.interrupt()
    finally:
        worker.join(60)
    assert made["r"].images == [] and not _status(served)["busy"]


def test_bad_requests_get_4xx_json_and_the_server_goes_on(served):
    cases = [
        ({"prompt": "x", "steps": "many"}, 422, "steps"),
        ({"prompt": "x", "width": 520}, 422, "multiple of 16"),
        ({"prompt": "x", "steps": 5000}, 422, "server's 200 per image"),
        ({"prompt": "x", "batch_size": 40}, 422, "at most 16"),
        ({"prompt": "x", "sampler_name": "DPM++ 2S a"}, 422, "no sampler"),
        ({"prompt": "x <lora:nothere:1>"}, 422, "not in the loras folder"),
        ({"prompt": "x <lora:../loras/style:1>"}, 422, "not in the loras folder"),
        ({"prompt": ""}, 422, "give a prompt"),
    ]
    for body, code, text in cases:
        status, _, raw = _call(served, "/sdapi/v1/txt2img", {**body, "width": body.get("width", 64),
                                                              "height": 64})
        assert status == code and text in json.loads(raw)["detail"], (body, raw)
    assert _call(served, "/sdapi/v1/txt2img", raw=b"{not json")[0] == 422
    assert _call(served, "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]})[0] == 422
    status, _, raw = _call(served, "/rdbt/v1/generate", raw=b"x" * 16, headers={"Content-Length": str(1 << 30)})
    assert status == 413
    assert _call(served, "/rdbt/v1/generate", {"prompt": "x", "model": "/etc/passwd"})[0] == 422
    assert _call(served, "/rdbt/v1/generate", {"prompt": "x", "bogus": 1})[0] == 422
    assert _call(served, "/nothing")[0] == 404
    status, _, raw = _call(served, "/sdapi/v1/txt2img", {"prompt": "x <lora:sdxl:1>", **SMALL})  # fails in the job
    assert status == 422 and "sdxl" in json.loads(raw)["detail"]
    status, headers, png = _call(served, "/rdbt/v1/generate", {"prompt": "still here", "seed": 1, **SMALL})
    assert status == 200 and headers["content-type"] == "image/png" and png.startswith(b"\x89PNG")


def test_native_api_png_and_event_stream(served):
    status, headers, png = _call(served, "/rdbt/v1/generate", {"prompt": "a fox", "seed": 9, "size": "64x64",
                                                              "steps": 2, "loras": ["style:0.3"]})
    image = Image.open(io.BytesIO(png))
    recipe = _recipe(image)
    assert status == 200 and headers["x-rdbt-seed"] == "9" and recipe["loras"][0]["weight"] == 0.3
    assert {"parameters", "rdbt", "prompt", "workflow"} <= set(image.info)
    watched = []

    def watch():
        with urllib.request.urlopen(served.url + "/rdbt/v1/events", timeout=60) as resp:
            for kind, data in client._events(resp):
                watched.append(kind)
                if kind == "step" and data["step"] == data["steps"]:
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)  # subscribed before the job starts
    req = urllib.request.Request(served.url + "/rdbt/v1/generate?preview=1", data=json.dumps(
        {"prompt": "a fox", "seed": 9, "count": 2, **SMALL}).encode(), headers={"Accept": "text/event-stream"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = list(client._events(resp))
    watcher.join(30)
    assert "step" in watched and "stage" in watched
    kinds = [k for k, _ in events]
    steps = [d for k, d in events if k == "step"]
    assert kinds.count("image") == 2 and kinds[-1] == "done" and steps[-1]["step"] == steps[-1]["steps"] == 4
    assert "eta" in steps[-1] and {"stage": "decode"} in [d for k, d in events if k == "stage"]
    assert Image.open(io.BytesIO(base64.b64decode(steps[0]["preview"]))).size == (8, 8)  # the latent's own size


def test_a_client_that_goes_away_cancels_its_job(served):
    before = _status(served)["made"]
    req = urllib.request.Request(served.url + "/rdbt/v1/generate", data=json.dumps(
        {"prompt": "long", "seed": 2, "steps": 200, "width": 128, "height": 128}).encode(),
        headers={"Accept": "text/event-stream"})
    resp = urllib.request.urlopen(req, timeout=60)
    for kind, _ in client._events(resp):
        if kind == "step":
            break
    resp.close()  # gone after the first step
    deadline = time.monotonic() + 30
    while _status(served)["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _status(served)["busy"] and _status(served)["made"] == before
    assert "client went away" in Path(served.log.name).read_text()


def test_concurrent_clients_every_accepted_job_completes_once(served):
    before = _status(served)["made"]
    results, lock = [], threading.Lock()

    def client_thread(n):
        for k in range(2):
            status, headers, png = _call(served, "/rdbt/v1/generate", {"prompt": f"c{n}", "seed": 100 * n + k,
                                                                      **SMALL})
            with lock:
                results.append((status, headers.get("x-rdbt-seed"), png))

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    accepted = [r for r in results if r[0] == 200]
    assert len(results) == 16 and all(r[0] in (200, 503) for r in results)
    assert sorted(int(r[1]) for r in accepted) == sorted({int(r[1]) for r in accepted})  # each once
    for status, seed, png in accepted:
        assert _recipe(Image.open(io.BytesIO(png)))["seed"] == int(seed)
    assert _status(served)["made"] - before == len(accepted) >= 8


def test_a_full_queue_answers_503_with_retry_after():
    from rdbt_cli import server
    from rdbt_cli.config import LoadParams

    service = server.Service(LoadParams(model="tiny"), limits=server.Limits(queue=1))
    try:
        service.submit(server.Item([], None, None))
        with pytest.raises(server.HTTPProblem) as err:
            service.submit(server.Item([], None, None))
        assert err.value.status == 503 and int(err.value.headers["Retry-After"]) >= 1
    finally:
        service.stop()


def test_api_key_on_every_route_and_other_hosts_need_one(tmp_path):
    from starlette.testclient import TestClient

    from rdbt_cli import server
    from rdbt_cli.config import LoadParams

    service = server.Service(LoadParams(model="tiny"))
    try:
        with TestClient(server.make_app(service, api_key="s3cret")) as http:
            for path in ("/rdbt/v1/status", "/sdapi/v1/samplers", "/sdapi/v1/progress", "/nothing"):
                assert http.get(path).status_code == 401
            assert http.post("/sdapi/v1/txt2img", json={"prompt": "x"}).json()["error"] == "Unauthorized"
            assert http.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert http.get("/sdapi/v1/samplers", auth=("webui", "s3cret")).status_code == 200  # webuiapi set_auth
    finally:
        service.stop()
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "tiny", "--port", "0"])
    assert result.exit_code == 2 and "--api-key" in result.output and "Traceback" not in result.output


def test_a_client_of_a_server_with_an_api_key(tmp_path, monkeypatch):
    """The key from $RDBT_API_KEY for a --server URL, or from the server's own announcement (readable by its user
    only); a missing or wrong key is one line that says where the key goes."""
    import uvicorn

    from rdbt_cli import server
    from rdbt_cli.config import LoadParams

    service = server.Service(LoadParams(model="tiny", device="cpu"), log=lambda m: None)
    service.start()
    sock = server.bind("127.0.0.1", 0)
    http = uvicorn.Server(uvicorn.Config(server.make_app(service, api_key="s3cret"), log_level="warning"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not http.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("RDBT_HOME", str(tmp_path / "home"))  # nothing announced there
        monkeypatch.delenv("RDBT_API_KEY", raising=False)
        args = ["gen", "a key", "--model", "tiny", "--steps", "2", "--size", "64x64", "--seed", "5", "--json", "-o",
                str(tmp_path / "out")]
        result = CliRunner().invoke(app, [*args, "--server", url])
        assert result.exit_code == 2 and "needs an API key; set $RDBT_API_KEY" in result.output
        monkeypatch.setenv("RDBT_API_KEY", "wrong")
        result = CliRunner().invoke(app, [*args, "--server", url])
        assert result.exit_code == 2 and "refused the API key in $RDBT_API_KEY" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        monkeypatch.setenv("RDBT_API_KEY", "s3cret")
        result = CliRunner().invoke(app, [*args, "--server", url])
        assert result.exit_code == 0, result.output
        assert service.made == 1 and Path(json.loads(result.stdout)["path"]).exists()

        monkeypatch.delenv("RDBT_API_KEY")
        announced = client.write_server_file(url, os.getpid(), "s3cret")  # as rdbt serve --api-key does
        assert announced.stat().st_mode & 0o077 == 0
        result = CliRunner().invoke(app, args)  # found through RDBT_HOME, with its key
        assert result.exit_code == 0 and service.made == 2, result.output
    finally:
        http.should_exit = True
        thread.join(30)
        service.stop()
        sock.close()


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch):
    import rdbt_cli

    monkeypatch.delattr(rdbt_cli, "server", raising=False)
    monkeypatch.delitem(sys.modules, "rdbt_cli.server", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    result = CliRunner().invoke(app, ["serve", "--model", "tiny", "--port", "0"])
    assert result.exit_code == 2 and "pip install 'rdbt[serve]'" in result.output


def test_gen_through_the_server_is_torch_free_and_makes_the_same_image(at_home, tmp_path, spawn):
    args = ["gen", "a red fox", "--model", "tiny", "--steps", "2", "--size", "64x64", "--seed", "21", "--lora",
            "style:0.7", "--models-dir", str(at_home.models), "--device", "cpu", "--json"]
    before = _status(at_home)["made"]
    run = spawn.run([sys.executable, "-X", "importtime", "-m", "rdbt_cli", *args, "-o", tmp_path / "remote",
                     "--preview-file", tmp_path / "step.png"],
                    env={**os.environ, "RDBT_HOME": str(at_home.home)}, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert _status(at_home)["made"] == before + 1  # made by the server
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "fastapi" not in imported and "numpy" not in imported
    # The server's step pictures went to --preview-file: the latent's size, as in-process; no temp file left.
    assert Image.open(tmp_path / "step.png").size == (8, 8) and not list(tmp_path.glob(".step.png*"))
    remote = json.loads(run.stdout)
    local = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "local"), "--no-server"])
    assert local.exit_code == 0, local.output
    assert _status(at_home)["made"] == before + 1  # --no-server made it here
    local = json.loads(local.stdout)
    a, b = Image.open(remote["path"]), Image.open(local["path"])
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.info == b.info  # the same chunks: recipe, A1111 text, ComfyUI graphs
    assert Path(remote["path"]).parent == tmp_path / "remote"  # written by the client, where the user said


def test_previews_through_the_server_only_when_shown(at_home, tmp_path):
    from rich.console import Console

    from rdbt_cli import preview

    def generates():
        return [ln for ln in Path(at_home.log.name).read_text().splitlines() if "/rdbt/v1/generate" in ln]

    args = ["gen", "a cat", "--model", "tiny", "--steps", "3", "--size", "64x64", "-o", str(tmp_path)]
    seen = len(generates())
    assert CliRunner().invoke(app, [*args, "--seed", "1"]).exit_code == 0  # no terminal, no --preview-file
    result = CliRunner().invoke(app, [*args, "--seed", "2", "--preview-file", str(tmp_path / "p.png"), "--quiet"])
    assert result.exit_code == 0, result.output
    asked = generates()[seen:]
    assert len(asked) == 2 and "preview=1" not in asked[0] and "preview=1" in asked[1]
    assert Image.open(tmp_path / "p.png").size == (8, 8)

    # What the terminal draws from a server's picture: the same renderable as from a latent in-process.
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, format="PNG")
    shown = preview.Preview("blocks", budget=None)
    shown.step({"i": 0, "preview_png": b"not a png"})  # skipped, not a failed image
    assert shown.current is None
    shown.step({"i": 1, "preview_png": png.getvalue()})
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=80)
    console.print(shown.current)
    assert "200;30;30" in console.file.getvalue()  # the picture's colour, in half blocks


def test_batch_through_the_server_and_a_stale_server_file(at_home, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one --seed 5\ntwo --seed 6 --count 2\n")
    before = _status(at_home)["made"]
    result = CliRunner().invoke(app, ["batch", str(prompts), "--model", "tiny", "--steps", "2", "--size", "64x64",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert _status(at_home)["made"] == before + 3 and len(list((tmp_path / "out").glob("*.png"))) == 3
    recipe = _recipe(Image.open(sorted((tmp_path / "out").glob("L0002-001*.png"))[0]))
    assert recipe["seed"] == 7 and recipe["batch"]["line"] == 2  # the batch's record, added by the client

    other = tmp_path / "stale_home"
    other.mkdir()
    (other / client.SERVER_FILE).write_text(json.dumps({"url": at_home.url, "pid": 2**22 + 12345}))
    monkeypatch.setenv("RDBT_HOME", str(other))
    assert client.find_running() is None
    assert "no rdbt server" in CliRunner().invoke(app, ["serve", "--status"]).output
    monkeypatch.setenv("RDBT_HOME", str(at_home.home))
    status = CliRunner().invoke(app, ["serve", "--status"])
    assert "model tiny" in status.output and at_home.url in status.output


def test_grid_through_the_server_makes_the_cells_it_makes_here(at_home, tmp_path):
    args = ["grid", "a red fox", "--x", "lora:style=0.7,0", "--y", "steps=1,2", "--model", "tiny", "--size", "64x64",
            "--seed", "4", "--models-dir", str(at_home.models), "--device", "cpu", "--quiet"]
    before = _status(at_home)["made"]
    remote = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "remote"), "--preview-file", tmp_path / "p.png"])
    assert remote.exit_code == 0, remote.output
    assert _status(at_home)["made"] == before + 4  # the server switched the LoRA's weight between cells
    assert Image.open(tmp_path / "p.png").size == (8, 8)  # the server's picture of the last step
    local = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "local"), "--no-server"])
    assert local.exit_code == 0 and _status(at_home)["made"] == before + 4, local.output
    made = [sorted((tmp_path / where).glob("*.png")) for where in ("remote", "local")]
    assert len(made[0]) == len(made[1]) == 5  # four cells and the sheet
    for a, b in zip(*made):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), (a, b)


def test_which_server_a_client_uses(at_home, tmp_path):
    from rdbt_cli.config import LoadParams, ModelPaths
    from rdbt_cli.errors import ConfigError
    from rdbt_cli.server import bind

    info = _status(at_home)
    tiny = ModelPaths(*(tmp_path / n for n in ("dit", "te", "vae", "q", "t")))
    assert client._mismatch(info, LoadParams(model="tiny"), tiny) is None
    assert client._mismatch(info, LoadParams(model="tiny", device="cpu", dtype="fp32"), tiny) is None
    assert "--dtype" in client._mismatch(info, LoadParams(model="tiny", dtype="bf16"), tiny)
    assert "model 'tiny'" in client._mismatch(info, LoadParams(model=str(tmp_path / "dit")), tiny)
    notes = []
    assert client.connect(None, LoadParams(model="tiny", dtype="bf16"), tiny, on_note=notes.append) is None
    assert "not used" in notes[0]
    with pytest.raises(ConfigError, match="--no-server"):
        client.connect(at_home.url, LoadParams(model="tiny", dtype="bf16"), tiny)
    result = CliRunner().invoke(app, ["gen", "x", "--model", "tiny", "--server", "http://127.0.0.1:9", "-o",
                                      str(tmp_path)])
    assert result.exit_code == 2 and "no rdbt server answers" in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="another server may be there"):
        bind("127.0.0.1", at_home.port)


def test_stop_ends_the_server_cleanly_and_cancels_its_job(at_home):
    events, started = [], threading.Event()

    def long_job():
        req = urllib.request.Request(at_home.url + "/rdbt/v1/generate", data=json.dumps(
            {"prompt": "long", "seed": 3, "steps": 200, "width": 128, "height": 128}).encode(),
            headers={"Accept": "text/event-stream"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            for kind, data in client._events(resp):
                events.append((kind, data))
                started.set()

    job = threading.Thread(target=long_job)
    job.start()
    assert started.wait(30)
    result = CliRunner().invoke(app, ["serve", "--stop"])
    job.join(30)
    assert events[-1] == ("done", {"interrupted": True, "images": 0})
    assert result.exit_code == 0 and "stopped" in result.output
    assert at_home.proc.wait(30) == 0  # SIGTERM is a clean exit
    assert not (at_home.home / client.SERVER_FILE).exists()
