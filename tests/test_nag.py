"""Normalized Attention Guidance: the rule, the DiT's guided cross-attention, the sigma window in the CFG denoiser,
and (below) the settings, the CLI and the ComfyUI parity cases of ../shared/golden2 (kind nag_fork)."""

import pytest
import torch

from rdbt_cli import engine, sampling
from rdbt_cli.config import TINY_DIT
from rdbt_cli.engine import NAG, load_dit
from rdbt_cli.errors import ConfigError
from rdbt_cli.tiny import write_tiny_dit


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return load_dit(write_tiny_dit(tmp_path_factory.mktemp("dit") / "anima_tiny.safetensors"), dtype=torch.float32)


def _context(seed: int, rows: int = 20) -> torch.Tensor:
    ctx = torch.zeros(1, 512, TINY_DIT.context_dim)
    ctx[:, :rows] = torch.randn(1, rows, TINY_DIT.context_dim, generator=torch.Generator().manual_seed(seed))
    return ctx  # zero rows after the text, as encode_context pads


def _latent(batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 16, 1, 8, 12, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The rule


def test_nag_rule_is_the_papers_per_token_l1_rule():
    g = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    s, tau, alpha = 5.0, 2.5, 0.25
    got = NAG(s, tau, alpha)(z_pos, z_neg)
    # Written out token by token: extrapolate, cap the L1 norm at tau times z+'s, blend.
    want = torch.empty_like(z_pos)
    for b in range(2):
        for t in range(7):
            guided = s * z_pos[b, t] - (s - 1) * z_neg[b, t]
            ratio = guided.abs().sum() / z_pos[b, t].abs().sum()
            if ratio > tau:
                guided = guided * tau / ratio
            want[b, t] = alpha * guided + (1 - alpha) * z_pos[b, t]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (torch.linalg.vector_norm(got - z_pos, 1, dim=-1) > 0).all()  # every token moved


def test_nag_scale_one_or_alpha_zero_returns_the_positive_exactly():
    g = torch.Generator().manual_seed(1)
    z_pos, z_neg = torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    assert torch.equal(NAG(1.0, 2.5, 0.25)(z_pos, z_neg), z_pos)
    assert torch.equal(NAG(5.0, 2.5, 0.0)(z_pos, z_neg), z_pos)


# ---------------------------------------------------------------------------------------------------------------------
# The DiT's guided cross-attention


@torch.inference_mode()
def test_dit_guides_only_the_last_rows_with_the_negatives_kv(dit):
    x, t = _latent(2), torch.tensor([0.7, 0.7])
    kv = dit.prepare_context(torch.cat([_context(1), _context(2)]))  # [uncond, cond], as CFG batches them
    plain = dit(x, t, kv=kv)
    guided = dit(x, t, kv=kv, nag=NAG(5.0, 2.5, 0.25), nag_kv=dit.prepare_context(_context(3)))
    assert torch.equal(guided[0], plain[0])  # the uncond row is not guided
    assert (guided[1] - plain[1]).abs().max() > 1e-3


@torch.inference_mode()
def test_dit_with_the_prompt_as_its_own_negative_is_unguided(dit):
    x, t, ctx = _latent(), torch.tensor([0.5]), _context(1)
    plain = dit(x, t, kv=dit.prepare_context(ctx))
    same = dit(x, t, kv=dit.prepare_context(ctx), nag=NAG(5.0, 2.5, 0.25), nag_kv=dit.prepare_context(ctx.clone()))
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The sigma window and CFG


def _guidance(start: float = 14.7, end: float = 0.0, negative=None) -> sampling.NAGGuidance:
    return sampling.NAGGuidance(_context(3) if negative is None else negative, NAG(5.0, 2.5, 0.25), start, end)


@torch.inference_mode()
def test_outside_the_sigma_window_a_step_is_the_unguided_step(dit):
    x, cond = _latent(), _context(1)
    plain = sampling.CFGDenoiser(dit, cond, None, 1.0)
    nag = sampling.CFGDenoiser(dit, cond, None, 1.0, nag=_guidance(start=0.8, end=0.4))
    for sigma, inside in [(0.99997, False), (0.8, True), (0.6, True), (0.4, True), (0.3, False)]:
        s = torch.tensor([sigma])
        same = torch.equal(nag(x, s), plain(x, s))
        assert same != inside, sigma


@torch.inference_mode()
def test_with_cfg_nag_guides_the_cond_branch_only(dit):
    x, s = _latent(), torch.tensor([0.75])
    cond, uncond, neg = _context(1), _context(2), _context(3)
    got = sampling.CFGDenoiser(dit, cond, uncond, 4.0, nag=_guidance(negative=neg))(x, s)
    # The same step written out: the uncond prediction plain, the cond one guided, then CFG on the two.
    d_u = x - dit(x, s, kv=dit.prepare_context(uncond)) * 0.75
    d_c = x - dit(x, s, kv=dit.prepare_context(cond), nag=NAG(5.0, 2.5, 0.25), nag_kv=dit.prepare_context(neg)) * 0.75
    torch.testing.assert_close(got, d_u + (d_c - d_u) * 4.0, rtol=0, atol=1e-4)  # batch-of-2 vs batch-of-1 rounding
    unguided = sampling.CFGDenoiser(dit, cond, uncond, 4.0)(x, s)
    assert (got - unguided).abs().max() > 1e-3


@torch.inference_mode()
def test_nag_kv_is_prepared_once_per_generation(dit, monkeypatch):
    calls = []
    real = engine.AnimaDiT.prepare_context
    monkeypatch.setattr(engine.AnimaDiT, "prepare_context", lambda self, c: calls.append(c.shape) or real(self, c))
    den = sampling.CFGDenoiser(dit, _context(1), None, 1.0, nag=_guidance())
    sigmas = sampling.get_sigmas("simple", 3)
    sampling.sample("euler", den, sampling.prepare_latent(1, torch.zeros(1, 16, 1, 8, 12), sigmas), sigmas, seed=1)
    assert len(calls) == 2  # the prompt's and the negative's, not one per step


def test_nag_needs_a_model_with_prepared_kv():
    with pytest.raises(ConfigError, match="NAG"):
        sampling.CFGDenoiser(lambda x, s, context: x, _context(1), None, 1.0, nag=_guidance())


# ---------------------------------------------------------------------------------------------------------------------
# Through the CLI: bad input, the invariants, every surface of the settings table, the ComfyUI graph

TINY = ["--model", "tiny", "--size", "64x48", "--steps", "3", "--seed", "5", "--cfg", "1", "--quiet"]
NAG_ON = ["-n", "blurry, lowres", "--nag-scale", "5"]

# KSamplerWithNAG's inputs in ComfyUI-NAG-Extended's node.py (BigStationW d31ebdac, unchanged in the fork): the graph
# rdbt writes must use exactly these, so that it opens in a ComfyUI with the pack.
KSAMPLER_WITH_NAG_INPUTS = {"model", "seed", "steps", "cfg", "nag_scale", "nag_tau", "nag_alpha", "nag_sigma_end",
                            "sampler_name", "scheduler", "positive", "negative", "nag_negative", "latent_image",
                            "denoise"}


def run(*args):
    from typer.testing import CliRunner

    from rdbt_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def chunks(path) -> dict:
    import json

    from PIL import Image

    return {k: json.loads(v) if k != "parameters" else v for k, v in Image.open(path).info.items()
            if k in ("parameters", "rdbt", "prompt", "workflow")}


@pytest.mark.parametrize("args,words", [
    (["--nag-scale", "5"], "needs a negative prompt"),
    (["--nag-scale", "5", "-n", "  "], "needs a negative prompt"),
    (["--nag-scale", "-1", "-n", "x"], "NAG scale must be 0 (off) or from 1"),
    (["--nag-scale", "0.5", "-n", "x"], "NAG scale must be 0 (off) or from 1"),
    ([*NAG_ON, "--nag-tau", "0"], "nag_tau must be at least 1"),
    ([*NAG_ON, "--nag-tau", "-2"], "nag_tau must be at least 1"),
    ([*NAG_ON, "--nag-alpha", "1.5"], "nag_alpha must be at most 1"),
    ([*NAG_ON, "--nag-alpha", "-0.1"], "nag_alpha must be from 0 to 1"),
    ([*NAG_ON, "--nag-sigma-start", "0.2", "--nag-sigma-end", "0.5"], "window is reversed"),
])
def test_bad_nag_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    r = run("gen", "1girl", *TINY, *args, "--out", tmp_path / "out")
    assert r.exit_code != 0
    out = r.output.strip()
    assert len(out.splitlines()) == 1 and "Traceback" not in out and words in out, out
    assert not (tmp_path / "out").exists()


def test_nag_is_recorded_everywhere_and_from_reproduces_it(tmp_path):
    a = tmp_path / "a.png"
    r = run("gen", "1girl, silver hair", *TINY, *NAG_ON, "--nag-sigma-end", "0.3", "--out", a)
    assert r.exit_code == 0 and "note:" not in r.output, r.output  # the negative is used at CFG 1 now
    meta = chunks(a)
    rec = meta["rdbt"]
    assert (rec["nag_scale"], rec["nag_tau"], rec["nag_alpha"], rec["nag_sigma_start"], rec["nag_sigma_end"]) == \
        (5.0, 2.5, 0.25, 14.7, 0.3)
    assert "NAG scale: 5, NAG tau: 2.5, NAG alpha: 0.25, NAG sigma end: 0.3" in meta["parameters"]
    node = next(n for n in meta["prompt"].values() if n["class_type"] == "KSamplerWithNAG")
    assert set(node["inputs"]) == KSAMPLER_WITH_NAG_INPUTS
    assert node["inputs"]["nag_negative"] == node["inputs"]["negative"]  # one negative: NAG's, and CFG's above 1
    assert (node["inputs"]["nag_scale"], node["inputs"]["nag_sigma_end"]) == (5.0, 0.3)
    ui = next(n for n in meta["workflow"]["nodes"] if n["type"] == "KSamplerWithNAG")
    assert ui["widgets_values"][:9] == [rec["seed"], "fixed", 3, 1.0, 5.0, 2.5, 0.25, 0.3, rec["sampler"]]
    shown = run("inspect", a).output
    assert "nag_scale:" in shown and "nag_sigma_end:" in shown
    again = tmp_path / "again.png"
    assert run("gen", "--from", a, "--quiet", "--out", again).exit_code == 0
    assert (pixels(again) == pixels(a)).all() and chunks(again)["rdbt"]["nag_sigma_end"] == 0.3
    # from the A1111 text alone (what a site keeps), the NAG fields come back too
    from rdbt_cli import metadata

    parsed = metadata.parse_parameters_text(meta["parameters"])
    assert (parsed["nag_scale"], parsed["nag_alpha"], parsed["nag_sigma_end"]) == (5.0, 0.25, 0.3)


def test_without_nag_nothing_about_it_is_written(tmp_path):
    a = tmp_path / "a.png"
    assert run("gen", "1girl", *TINY, "-n", "blurry", "--out", a).exit_code == 0
    meta = chunks(a)
    assert "NAG" not in meta["parameters"] and "nag_scale" not in run("inspect", a).output
    assert {n["class_type"] for n in meta["prompt"].values()} >= {"KSampler"}
    assert not any("NAG" in n["class_type"] for n in meta["prompt"].values())


def test_a_window_starting_below_sigma_1_is_written_with_the_packs_guider(tmp_path):
    a = tmp_path / "a.png"
    assert run("gen", "1girl", *TINY, *NAG_ON, "--nag-sigma-start", "0.8", "--out", a).exit_code == 0
    graph = chunks(a)["prompt"]
    by_class = {n["class_type"]: n for n in graph.values()}
    assert "KSamplerWithNAG" not in by_class  # it would act from sigma 14.7
    guider = by_class["NAGCFGGuiderAdvanced"]["inputs"]
    assert (guider["nag_sigma_start"], guider["nag_scale"]) == (0.8, 5.0)
    decode = by_class["VAEDecode"]["inputs"]["samples"][0]
    assert graph[decode]["class_type"] == "SamplerCustomAdvanced"
    assert graph[graph[decode]["inputs"]["guider"][0]]["class_type"] == "NAGCFGGuiderAdvanced"


def test_invariants_through_gen(tmp_path):
    def make(name, *args):
        out = tmp_path / f"{name}.png"
        r = run("gen", "1girl, silver hair", *TINY, "-n", "blurry, lowres", *args, "--out", out)
        assert r.exit_code == 0, r.output
        return pixels(out)

    plain = make("plain")
    guided = make("guided", "--nag-scale", "5")
    assert abs(guided - plain).max() > 2  # NAG does something
    assert (make("scale1", "--nag-scale", "1") == plain).all()  # the node switches itself off at 1
    # a window no sampled sigma falls in: every step is the unguided step
    assert (make("window", "--nag-scale", "5", "--nag-sigma-start", "0.05", "--nag-sigma-end", "0.01") == plain).all()
    # the prompt as its own negative: the guided attention is the prompt's own
    same = run("gen", "1girl, silver hair", *TINY, "-n", "1girl, silver hair", "--nag-scale", "5", "--out",
               tmp_path / "same.png")
    assert same.exit_code == 0
    assert abs(pixels(tmp_path / "same.png") - plain).max() <= 1


def test_presets_and_batch_lines_set_nag(tmp_path):
    preset = tmp_path / "nag.toml"
    preset.write_text('negative = "blurry"\nnag_scale = 4\nnag_alpha = 0.5\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1girl\n1boy --nag-scale 6 --nag-tau 3\n")
    r = run("batch", prompts, "--preset", preset, "--model", "tiny", "--size", "64x48", "--steps", "2", "--quiet",
            "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    recs = sorted((chunks(p)["rdbt"] for p in (tmp_path / "out").glob("*.png")), key=lambda rec: rec["prompt"])
    assert [(rec["prompt"], rec["nag_scale"], rec["nag_tau"], rec["nag_alpha"]) for rec in recs] == \
        [("1boy", 6.0, 3.0, 0.5), ("1girl", 4.0, 2.5, 0.5)]


def test_a_bad_batch_line_fails_alone(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('1girl -n "blurry" --nag-scale 5\n1boy --nag-scale 5\n')
    r = run("batch", prompts, "--model", "tiny", "--size", "64x48", "--steps", "2", "--quiet", "--out", tmp_path / "o")
    assert r.exit_code != 0 and "line 2" in r.output and "needs a negative prompt" in r.output
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI + the NAG-Extended fork (../shared/golden2, kind nag_fork), through the real `rdbt gen`

def _golden_cases():
    import json

    from conftest import SHARED

    index = SHARED / "golden2" / "cases.json"
    return [c for c in json.loads(index.read_text())["cases"] if c["kind"] == "nag_fork"] if index.exists() else []


NAG_CASES = _golden_cases()


def _golden_args(case) -> list:
    from conftest import shared_path

    s = case["settings"]
    nag = s["nag"]
    if s["cfg"] != 1 and s["negative"] != nag["nag_negative"]:
        pytest.skip("rdbt has one negative prompt; this case gives CFG and NAG different ones")
    args = ["gen", s["prompt"], "-n", nag["nag_negative"], "--seed", s["seed"], "--steps", s["steps"], "--cfg", s["cfg"],
            "--sampler", s["sampler"], "--scheduler", s["scheduler"], "--size", f"{s['width']}x{s['height']}",
            "--shift", s["shift"]]
    for key in ("nag_scale", "nag_tau", "nag_alpha", "nag_sigma_start", "nag_sigma_end"):
        args += [f"--{key.replace('_', '-')}", nag[key]]
    for name, weight in s["loras"]:
        args += ["--lora", f"{name.removesuffix('.safetensors')}:{weight}"]
    return args + ["--models-dir", shared_path("golden", "models"), "--device", "cpu", "--dtype", "fp32", "--no-stack",
                   "--quiet"]


def _assert_matches(got, expected):
    d = abs(got - expected)
    worst, mean, frac = int(d.max()), float(d.mean()), float((d > 1).mean())
    # The README's float32 tolerances: max 2 levels, mean 0.02, at most 0.1 % of sub-pixels off by more than 1.
    assert worst <= 2 and mean <= 0.02 and frac <= 1e-3, (worst, mean, frac)


@pytest.mark.parametrize("case", NAG_CASES, ids=[c["id"] for c in NAG_CASES])
def test_nag_golden_case_matches_comfyui_with_the_fork(case, tmp_path):
    from conftest import shared_path

    expected = pixels(shared_path("golden2", case["expected"]))
    out = tmp_path / "img.png"
    r = run(*_golden_args(case), "--out", out)
    assert r.exit_code == 0, r.output
    _assert_matches(pixels(out), expected)
    # rdbt's graph sets KSamplerWithNAG's inputs as the case's graph does
    import json

    theirs = json.loads(shared_path("golden2", case["files"]["graph"]).read_text())
    theirs = next(n["inputs"] for n in theirs.values() if n["class_type"] == "KSamplerWithNAG")
    ours = next(n["inputs"] for n in chunks(out)["prompt"].values() if n["class_type"] == "KSamplerWithNAG")
    assert set(ours) == set(theirs) == KSAMPLER_WITH_NAG_INPUTS
    assert {k: v for k, v in ours.items() if not isinstance(v, list)} == \
        {k: v for k, v in theirs.items() if not isinstance(v, list)}


@pytest.mark.parametrize("case", NAG_CASES, ids=[c["id"] for c in NAG_CASES])
def test_gen_from_the_comfyui_png_makes_the_same_image(case, tmp_path):
    from conftest import shared_path

    png = shared_path("golden2", case["expected"])
    out = tmp_path / "img.png"
    r = run("gen", "--from", png, "--models-dir", shared_path("golden", "models"), "--device", "cpu", "--dtype", "fp32",
            "--no-stack", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    _assert_matches(pixels(out), pixels(png))


def test_the_packs_node_has_the_inputs_rdbt_writes():
    import json

    from conftest import shared_path

    pack = json.loads(shared_path("golden2", "cases.json").read_text())["nag_node_pack"]["registered_nodes_and_inputs"]
    assert set(pack["KSamplerWithNAG"]) == KSAMPLER_WITH_NAG_INPUTS


if not NAG_CASES:

    def test_nag_golden_cases_present():
        from conftest import shared_path

        shared_path("golden2", "cases.json")
