"""Sampling against ComfyUI's numbers (spec/sampling.md §7–§8) and analytic Gaussian oracles; no model needed."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from conftest import shared_path
from rdbt_cli import config, sampling
from rdbt_cli.errors import ConfigError

STOCHASTIC = ("er_sde", "sa_solver_pece", "sa_solver", "euler_ancestral", "dpmpp_2m_sde")
OFFSET_SAMPLERS = ("er_sde", "sa_solver", "sa_solver_pece", "dpmpp_2m_sde")
# percent_to_sigma(1e-4) at shift 3 as a float32 sigma tensor stores it
OFFSET_F32 = float(torch.tensor(0.9999666644442963, dtype=torch.float32))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # every tensor here is tiny: a second intra-op thread only spin-waits on the shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref():
    return json.loads(shared_path("spec", "sampling_reference.json").read_text())


def gaussian(mu, s):
    """Exact x0-prediction for x0 ~ N(mu, s^2) under x = (1 - sigma) x0 + sigma noise, in the reference's op order."""

    def denoise(x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        a = 1 - sigma
        return mu + a * s**2 * (x - a * mu) / (a**2 * s**2 + sigma**2)

    return denoise


COND, UNCOND = gaussian(0.7, 0.35), gaussian(0.2, 0.6)


def cfg4(x, sigma):
    u, c = UNCOND(x, sigma), COND(x, sigma)
    return u + (c - u) * 4.0


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.sigmas = fn, 0, []

    def __call__(self, x, sigma):
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.fn(x, sigma)


# --------------------------------------------------------------------------------------------------------------------
# Model sampling and schedules


def test_sigma_table_and_percent_to_sigma(ref):
    ms = sampling.ModelSampling()
    assert ms.sigmas.dtype == torch.float32 and ms.sigmas.shape == (1000,)
    assert ms.sigmas[:3].tolist() == ref["sigma_table"]["first3"]
    assert ms.sigmas[-3:].tolist() == ref["sigma_table"]["last3"]
    assert float(ms.sigma_min) == ref["sigma_table"]["sigma_min"] and float(ms.sigma_max) == 1.0
    assert ms.timestep(ms.sigmas[500]) == ms.sigmas[500]  # the DiT sees sigma itself
    # doubles, not the float32 table entries (spec §1.2)
    assert ms.percent_to_sigma(0.2) == 0.9230769230769231
    assert ms.percent_to_sigma(0.8) == 0.4285714285714285
    assert ms.percent_to_sigma(1e-4) == 0.9999666644442963
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert torch.equal(sampling.ModelSampling(shift=1.0).sigmas, torch.arange(1, 1001) / 1000)


@pytest.mark.parametrize("name", config.SCHEDULER_NAMES)
def test_schedules_equal_comfyui_30_steps(ref, name):
    got = sampling.get_sigmas(name, 30)
    assert got.dtype == torch.float32
    assert got.tolist() == ref["sigmas30"][name]


def _shift(t, shift=3.0):
    return shift * t / (1 + (shift - 1) * t)


def _formula(name, n):
    """The schedules written from spec §1.5 in float64 (independent of the float32 code paths)."""
    smin, smax = _shift(1 / 1000), 1.0
    if name == "simple":
        vals = [_shift(1 - int(i * (1000 / n)) / 1000) for i in range(n)]
    elif name == "normal":
        vals = [_shift(u) for u in np.linspace(smax, smin, n)]
    elif name == "sgm_uniform":
        vals = [_shift(u) for u in np.linspace(smax, smin, n + 1)[:-1]]
    elif name == "karras":
        ramp = np.linspace(0, 1, n)
        vals = list((smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7)
    elif name == "exponential":
        vals = list(np.exp(np.linspace(math.log(smax), math.log(smin), n)))
    elif name == "beta":
        scipy_stats = pytest.importorskip("scipy.stats")
        ts = np.rint(scipy_stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
        vals, last = [], None
        for t in ts:
            if t != last:
                vals.append(_shift((int(t) + 1) / 1000))
            last = t
    elif name == "linear_quadratic":
        L, Q = n // 2, n - n // 2
        d = L - 0.025 * n
        q, lin = d / (L * Q**2), 0.025 / L - 2 * d / Q**2
        vals = [1 - i * 0.025 / L for i in range(L)] + [1 - (q * i * i + lin * i + q * L * L) for i in range(L, n)]
        return vals + [0.0]
    return vals + [0.0]


@pytest.mark.parametrize("n", [4, 20])
@pytest.mark.parametrize("name", config.SCHEDULER_NAMES)
def test_schedules_follow_their_formulas(name, n):
    got = sampling.get_sigmas(name, n).double().numpy()
    want = np.array(_formula(name, n))
    assert got.shape == want.shape and got[-1] == 0.0
    # float32 rounding of every op on the way: a few ulps
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_schedule_structure():
    normal = sampling.get_sigmas("normal", 8)
    assert float(normal[-2]) == pytest.approx(0.0089285718, abs=1e-9)  # the double shift at the low end
    assert len(sampling.get_sigmas("beta", 138)) == 139 and len(sampling.get_sigmas("beta", 139)) < 140
    assert sampling.get_sigmas("linear_quadratic", 1).tolist() == [1.0, 0.0]
    lq = sampling.get_sigmas("linear_quadratic", 10)
    assert torch.equal(sampling.get_sigmas("linear_quadratic", 10, shift=5.0), lq)
    assert not torch.equal(sampling.get_sigmas("simple", 10, shift=5.0), sampling.get_sigmas("simple", 10))
    # partial denoise keeps the tail of a longer schedule; <= 0 leaves the latent alone
    assert torch.equal(sampling.get_sigmas("simple", 10, denoise=0.5), sampling.get_sigmas("simple", 20)[-11:])
    assert torch.equal(sampling.get_sigmas("simple", 10, denoise=0.99995), sampling.get_sigmas("simple", 10))
    assert len(sampling.get_sigmas("simple", 10, denoise=0.0)) == 0


def test_golden_case_sigmas():
    cases = json.loads(shared_path("golden", "cases.json").read_text())["cases"]
    for case in cases:
        got = sampling.get_sigmas(case["scheduler"], case["steps"], denoise=case["denoise"])
        assert got.tolist() == case["expected_outputs"]["sigmas"], case["id"]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        sampling.get_sigmas("karas", 10)
    assert "'karas'" in str(err.value) and all(n in str(err.value) for n in config.SCHEDULER_NAMES)
    x = torch.zeros(1, 4)
    with pytest.raises(ConfigError) as err:
        sampling.sample("eular", cfg4, x, sampling.get_sigmas("simple", 4), seed=0)
    assert "'eular'" in str(err.value) and all(n in str(err.value) for n in config.SAMPLER_NAMES)
    assert "\n" not in str(err.value)
    assert tuple(sampling.SAMPLERS) == config.SAMPLER_NAMES
    assert tuple(sampling.SCHEDULERS) == config.SCHEDULER_NAMES


# --------------------------------------------------------------------------------------------------------------------
# Seeds and noise


def test_initial_noise_matches_comfyui(ref):
    for seed, want in ref["noise"].items():
        noise = sampling.initial_noise(int(seed), [1, 16, 1, 128, 128])
        assert noise.dtype == torch.float32 and noise.device.type == "cpu"
        flat = noise.flatten()
        assert flat[:8].tolist() == want["first8"] and flat[-2:].tolist() == want["last2"]
        assert hashlib.md5(noise.numpy().tobytes()).hexdigest() == want["md5"]
        assert flat.double().sum().item() == pytest.approx(want["sum"], rel=1e-9)


def test_initial_noise_golden_file_and_seed_range():
    want = np.load(shared_path("golden", "latents", "er_sde_simple_4_cfg4_tags_s0_initial_noise.npy"))
    assert np.array_equal(sampling.initial_noise(42, want.shape).numpy(), want)
    # MT19937 keeps the low 32 bits: the template seed equals 384831033
    assert torch.equal(sampling.initial_noise(875817230929465, [4, 16]), sampling.initial_noise(384831033, [4, 16]))
    assert sampling.initial_noise(2**64 - 1, [16]).shape == (16,)
    for bad in (-1, 2**64, 1.5):
        with pytest.raises(ConfigError):
            sampling.initial_noise(bad, [16])


def test_prepare_latent_and_noise_scaling():
    latent = torch.full([1, 16, 1, 2, 2], 0.25)
    noise = sampling.initial_noise(7, latent.shape)
    assert torch.equal(sampling.prepare_latent(7, torch.zeros_like(latent), sampling.get_sigmas("simple", 4)), noise)
    sigmas = torch.tensor([0.5, 0.0])
    assert torch.equal(sampling.prepare_latent(7, latent, sigmas), 0.5 * noise + 0.5 * latent)
    # a run stopped early returns x / (1 - sigma_N), which noise_scaling at that sigma undoes
    out = sampling.sample("euler", lambda x, s: torch.zeros_like(x), noise, torch.tensor([1.0, 0.5]), seed=0)
    assert torch.allclose(out, noise * 0.5 / 0.5)


def test_default_noise_sampler_uses_seed_plus_one_on_cpu():
    x = torch.zeros(2, 16)
    ns = sampling.default_noise_sampler(x, 42)
    g = torch.Generator().manual_seed(43)
    for _ in range(3):  # one persistent stream for the whole run
        assert torch.equal(ns(None, None), torch.randn(x.shape, generator=g))
    # ComfyUI's seed + 1 overflows at 2**64 - 1; wrapped to 0 it is the stream MT19937 would use
    assert torch.equal(sampling.default_noise_sampler(x, 2**64 - 1)(None, None), torch.randn(x.shape,
                       generator=torch.Generator().manual_seed(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_noise_sampler_uses_seed_on_cuda():
    x = torch.zeros(2, 16, device="cuda")
    want = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(42))
    assert torch.equal(sampling.default_noise_sampler(x, 42)(None, None), want)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_called_without_noise_say_so(name):
    with pytest.raises(ConfigError, match="noise sampler"):
        sampling.SAMPLERS[name].fn(COND, torch.zeros(1, 4), sampling.get_sigmas("simple", 10))


def test_brownian_tree_noise_is_standard_normal_and_reproducible():
    x = torch.zeros(1, 16, 1, 16, 16)
    sigmas = sampling.get_sigmas("simple", 10)
    z1 = sampling.make_noise_sampler("dpmpp_2m_sde", x, sigmas, 5)(sigmas[2], sigmas[3])
    z2 = sampling.make_noise_sampler("dpmpp_2m_sde", x, sigmas, 5)(sigmas[2], sigmas[3])
    assert torch.equal(z1, z2)
    n = z1.numel()
    assert abs(z1.mean().item()) < 5 / math.sqrt(n) and abs(z1.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert sampling.make_noise_sampler("euler", x, sigmas, 5) is None


# --------------------------------------------------------------------------------------------------------------------
# Samplers against ComfyUI's float32 runs (spec §7.5) and exact output laws (§7.3)


@pytest.mark.parametrize("n", [10, 30])
@pytest.mark.parametrize("name", config.SAMPLER_NAMES)
def test_runs_match_comfyui(ref, name, n):
    want = ref["runs"][f"{name}/simple/{n}"]
    sigmas = sampling.get_sigmas("simple", n)
    x = sampling.prepare_latent(42, torch.zeros(1, 16, 1, 8, 8), sigmas)
    model = Counting(cfg4)
    out = sampling.sample(name, model, x, sigmas, seed=42).flatten().double()
    assert model.calls == want["nfe"]
    assert np.abs(out[:4].numpy() - np.array(want["first4"])).max() <= 1e-5
    assert out.mean().item() == pytest.approx(want["mean"], abs=1e-6)
    assert out.std().item() == pytest.approx(want["std"], abs=1e-6)


def _probe(name, law, sigmas):
    """out = Q + P xi + sum_k R_k z_k for the affine Gaussian case, read off by impulses in one batched float64 run."""
    n = len(sigmas) - 1
    m = 2 + n  # [xi = 0, xi = 1, one impulse per possible draw]
    x = torch.zeros(1, m, dtype=torch.float64)
    x[0, 1] = 1.0
    draws = []

    def impulse(sigma, sigma_next):
        z = torch.zeros(1, m, dtype=torch.float64)
        z[0, 2 + len(draws)] = 1.0
        draws.append(float(sigma_next))
        return z

    model = Counting(law)
    out = sampling.SAMPLERS[name].fn(model, x, sigmas, noise_sampler=impulse)[0]
    q, p, r = out[0].item(), (out[1] - out[0]).item(), out[2:] - out[0]
    return q, p, math.sqrt(p * p + (r**2).sum().item()), len(draws), model.calls


@pytest.mark.parametrize("law", ["single_N(0.7,0.35^2)", "cfg4_cond_N(0.7,0.35^2)_uncond_N(0.2,0.6^2)"])
def test_exact_output_law_matches_comfyui(ref, law):
    fn = COND if law.startswith("single") else cfg4
    schedules = {}
    for key, want in ref["exact_output_moments_float64"][law].items():
        name, scheduler, n = key.split("/")
        if (scheduler, n) not in schedules:
            schedules[scheduler, n] = sampling.get_sigmas(scheduler, int(n)).double()
        sigmas = schedules[scheduler, n].clone()
        if name in OFFSET_SAMPLERS:  # the reference keeps the float32 offset value, as a float32 run stores it
            sigmas[0] = OFFSET_F32
        q, p, sd, draws, nfe = _probe(name, fn, sigmas)
        assert (draws, nfe) == (want["noise_draws"], want["nfe"]), key
        assert abs(q - want["mean"]) < 1e-6 and abs(sd - want["std"]) < 1e-6, key
        assert abs(p - want["coef_initial_noise"]) < 1e-6, key


@pytest.mark.parametrize("name", config.SAMPLER_NAMES)
def test_output_moments_with_real_noise(ref, name):
    # 65,536 iid elements in a batch of 4: the exact law from the reference bounds mean and std statistically
    want = ref["exact_output_moments_float64"]["single_N(0.7,0.35^2)"][f"{name}/simple/10"]
    sigmas = sampling.get_sigmas("simple", 10)
    x = sampling.prepare_latent(1234, torch.zeros(4, 16, 1, 32, 32), sigmas)
    out = sampling.sample(name, COND, x, sigmas, seed=1234).double()
    n = out.numel()
    assert abs(out.mean().item() - want["mean"]) < 5 * want["std"] / math.sqrt(n)
    assert abs(out.std().item() / want["std"] - 1) < 5 / math.sqrt(2 * n)


def test_sa_solver_noise_steps(ref):
    table = ref["sa_solver_noise_steps"]
    for n, want in table["simple"].items():
        sigmas = sampling.get_sigmas("simple", int(n))
        for name in ("sa_solver", "sa_solver_pece"):
            steps = []

            def record(sigma, sigma_next, steps=steps, sigmas=sigmas):
                steps.append(int((sigmas == sigma_next).nonzero()[0]) - 1)
                return torch.zeros(1, 4)

            sampling.SAMPLERS[name].fn(COND, torch.zeros(1, 4), sigmas, noise_sampler=record)
            assert steps == want, (name, n)


def _exact_flow(mu, s, sigma0, sigma1, x0):
    a0, a1 = 1 - sigma0, 1 - sigma1
    return a1 * mu + math.sqrt(a1**2 * s**2 + sigma1**2) * (x0 - a0 * mu) / math.sqrt(a0**2 * s**2 + sigma0**2)


ORDER_CASES = {
    # name: (sampler, options, steps (N, 2N), expected order range); the SDE samplers in their ODE settings
    "euler": ("euler", {}, (64, 128), (0.85, 1.2)),
    "dpmpp_2m": ("dpmpp_2m", {}, (64, 128), (1.7, 2.3)),
    "res_multistep": ("res_multistep", {}, (64, 128), (1.7, 2.3)),
    "dpmpp_2m_sde eta 0": ("dpmpp_2m_sde", {"eta": 0.0}, (64, 128), (1.5, 2.3)),
    # third-order stages, but ComfyUI's 200-point left Riemann quadrature caps what is seen at these N
    "er_sde ODE": ("er_sde", {"s_noise": 0.0, "noise_scaler": lambda lam: lam}, (32, 64), (1.8, 3.2)),
    "sa_solver tau 0": ("sa_solver", {"tau_func": lambda s: 0.0}, (32, 128), (3.0, 6.0)),
    "sa_solver_pece tau 0": ("sa_solver_pece", {"tau_func": lambda s: 0.0}, (32, 128), (3.0, 6.0)),
}


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_convergence_order(case):
    # spec §7.2: sigmas shift3(1 - k (1 - 0.05) / N), no final zero step (its O(sigma^2) bias would hide the order)
    name, options, (n1, n2), (lo, hi) = ORDER_CASES[case]
    xi = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_start = OFFSET_F32 if name in OFFSET_SAMPLERS else 1.0
    errors = []
    for n in (n1, n2):
        t = torch.tensor([1 - k * 0.95 / n for k in range(n + 1)], dtype=torch.float64)
        sigmas = 3 * t / (1 + 2 * t)
        out = sampling.SAMPLERS[name].fn(COND, xi.clone(), sigmas, **options)
        errors.append((out - _exact_flow(0.7, 0.35, sigma_start, float(sigmas[-1]), xi)).abs().max().item())
    order = math.log2(errors[0] / errors[1]) / math.log2(n2 / n1)
    assert lo <= order <= hi, (case, errors, order)
    assert errors[1] < 2e-2


def test_cfg_ode_converges_to_reference_solution():
    # spec §7.4: CFG 4 with cond N(0.7, 0.35^2), uncond N(0.2, 0.6^2) maps x(1) = xi to P xi + Q at sigma_end
    p_ref, q_ref = 0.078601920, 0.980797554
    xi = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(1, 9)
    t = torch.tensor([1 - k * 0.95 / 128 for k in range(129)], dtype=torch.float64)
    out = sampling.sample_dpmpp_2m(cfg4, xi, 3 * t / (1 + 2 * t))
    assert (out - (p_ref * xi + q_ref)).abs().max().item() < 2 * 2.56e-3  # spec's measured error at N = 128


# --------------------------------------------------------------------------------------------------------------------
# Structural invariants


@pytest.mark.parametrize("name", config.SAMPLER_NAMES)
def test_first_sigma_and_final_step(name):
    sigmas = sampling.get_sigmas("simple", 6)
    model = Counting(lambda x, s: torch.full_like(x, 0.3125))
    out = sampling.sample(name, model, torch.randn(2, 16, 1, 2, 2), sigmas, seed=3)
    assert model.sigmas[0] == (OFFSET_F32 if name in OFFSET_SAMPLERS else 1.0)
    if name not in ("euler", "res_multistep"):  # explicit denoise step: exactly the last prediction
        assert torch.equal(out, torch.full_like(out, 0.3125))
    else:
        assert torch.allclose(out, torch.full_like(out, 0.3125), atol=1e-6)


@pytest.mark.parametrize("name", config.SAMPLER_NAMES)
def test_callback_reports_every_step_and_can_cancel(name):
    sigmas = sampling.get_sigmas("simple", 5)
    x = sampling.prepare_latent(0, torch.zeros(1, 16, 1, 2, 2), sigmas)
    seen = []
    sampling.sample(name, COND, x, sigmas, seed=0, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(5))
    assert all(set(s) >= {"i", "sigma", "x", "denoised"} and s["x"].shape == x.shape for s in seen)

    def cancel(state):
        if state["i"] == 1:
            raise sampling.Cancelled()

    model = Counting(COND)
    with pytest.raises(sampling.Cancelled):
        sampling.sample(name, model, x, sigmas, seed=0, callback=cancel)
    assert model.calls <= 3


# --------------------------------------------------------------------------------------------------------------------
# CFG


class VelocityModel:
    """A mock DiT: the Gaussian velocity (x - D) / sigma, with context row 0 choosing cond (1) or uncond (0)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context):
        self.calls.append((x.shape[0], context.clone()))
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        use_cond = context[:, :1, :1].reshape(-1, *([1] * (x.ndim - 1))) > 0.5
        d = torch.where(use_cond, COND(x, sigma), UNCOND(x, sigma))
        return (x - d) / s


@pytest.mark.parametrize("batch", [1, 3])
def test_cfg_batches_uncond_first_in_one_call(batch):
    cond, uncond = torch.ones(1, 5, 8), torch.zeros(1, 5, 8)
    fn = VelocityModel()
    den = sampling.CFGDenoiser(fn, cond, uncond, 4.0)
    x = torch.randn(batch, 16, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma = torch.full([batch], 0.75)
    got = den(x, sigma)
    assert len(fn.calls) == 1
    n, ctx = fn.calls[0]
    assert n == 2 * batch and torch.equal(ctx[:batch], uncond.expand(batch, 5, 8))
    assert torch.equal(ctx[batch:], cond.expand(batch, 5, 8))
    # x0 = x - sigma v on each branch, then uncond + cfg (cond - uncond) on the denoised predictions
    s = sigma.reshape(-1, 1, 1, 1, 1)
    d_c = x - VelocityModel()(x, sigma, cond.expand(batch, 5, 8)) * s
    d_u = x - VelocityModel()(x, sigma, uncond.expand(batch, 5, 8)) * s
    assert torch.equal(got, d_u + (d_c - d_u) * 4.0)


def test_cfg_one_skips_uncond_and_equals_cond_only():
    fn = VelocityModel()
    cond = torch.ones(1, 5, 8)
    den = sampling.CFGDenoiser(fn, cond, None, 1.0)
    sigmas = sampling.get_sigmas("simple", 4)
    x = sampling.prepare_latent(9, torch.zeros(2, 16, 1, 2, 2), sigmas)
    out = sampling.sample("euler", den, x, sigmas, seed=9)
    assert [n for n, _ in fn.calls] == [2] * 4  # one cond-only call per step, batch B

    def cond_only(x, s):
        return x - VelocityModel()(x, s, cond.expand(2, 5, 8)) * s.reshape(-1, 1, 1, 1, 1)

    plain = sampling.sample("euler", cond_only, x, sigmas, seed=9)
    assert torch.equal(out, plain)
    # within 1e-9 of 1 ComfyUI still skips the negative but scales: cond * cfg
    near = sampling.CFGDenoiser(VelocityModel(), cond, torch.zeros(1, 5, 8), 1.0 + 1e-12)
    sigma = torch.full([2], 0.5)
    assert torch.equal(near(x, sigma), cond_only(x, sigma) * (1.0 + 1e-12))
    assert [n for n, _ in near.model_fn.calls] == [2]
    with pytest.raises(ConfigError):
        sampling.CFGDenoiser(fn, cond, None, 4.0)


def test_cfg_denoiser_reproduces_the_reference_run(ref):
    want = ref["runs"]["er_sde/simple/30"]
    sigmas = sampling.get_sigmas("simple", 30)
    x = sampling.prepare_latent(42, torch.zeros(1, 16, 1, 8, 8), sigmas)
    fn = VelocityModel()
    den = sampling.CFGDenoiser(fn, torch.ones(1, 5, 8), torch.zeros(1, 5, 8), 4.0)
    out = sampling.sample("er_sde", den, x, sigmas, seed=42).flatten()
    assert len(fn.calls) == 30 and all(n == 2 for n, _ in fn.calls)
    assert np.abs(out[:4].double().numpy() - np.array(want["first4"])).max() <= 1e-5


def test_cfg_runs_contexts_of_different_lengths_one_after_the_other():
    # A prompt longer than 512 T5 tokens gives a longer context than the negative: no shared batch (ComfyUI splits).
    calls = []

    def model_fn(x, sigma, context):
        calls.append(context.shape[1])
        return x * context.mean()

    cond, uncond = torch.full((1, 600, 4), 2.0), torch.full((1, 512, 4), 0.5)
    den = sampling.CFGDenoiser(model_fn, cond, uncond, 3.0)
    x, sigma = torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5])
    out = den(x, sigma)
    assert calls == [512, 600]
    d_u, d_c = x - 0.5 * x * 0.5, x - 0.5 * x * 2.0
    assert torch.allclose(out, d_u + (d_c - d_u) * 3.0)
