"""Schedules, samplers, CFG and seeds for Anima, matching ComfyUI's numbers (spec/sampling.md).

Parameterisation (stated once; every function below assumes it). Anima is a rectified-flow model in ComfyUI's
`ModelSamplingDiscreteFlow` + `CONST` form:

    x_sigma = (1 - sigma) * x0 + sigma * noise,   alpha = 1 - sigma,   sigma in [0, 1]
    the DiT's timestep is sigma itself (multiplier 1.0, not 1000 * sigma)
    the DiT predicts the velocity v = noise - x0, so  x0 = denoised = x - sigma * v   (fp32)
    sigma = shift * t / (1 + (shift - 1) * t) over t = k/1000, k = 1..1000, shift 3 by default

A sampler is a plain function `sample_<name>(model, x, sigmas, *, callback=None, noise_sampler=None, **options)`
where `model(x, sigma_batch) -> denoised` (x0), registered in SAMPLERS with the noise it draws and whether it needs the
ModelSampling. Guidance (CFG) is a wrapper around the model, never a sampler option.
Stochastic samplers use the RF forms and, where ComfyUI does, replace a first sigma of 1.0 by sigma(0.9999) so the
half-log-SNR stays finite. Noise is drawn as ComfyUI does on the same device type: initial noise on a CPU generator,
per-step noise on a generator on x's device seeded with seed + 1 on CPU (seed on CUDA), Brownian-tree noise on CPU.

All schedules are float32 and equal ComfyUI's reference values whatever the torch build: linspace follows ATen's CPU
rule and karras/exponential round pow/exp correctly (ComfyUI inherits its torch build's float32 pow/exp, which can be
1 ulp off). Sampler arithmetic follows ComfyUI's op order so that float32 runs agree to float rounding
(spec/sampling.md §0, L1/L2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rdbt_cli.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_SEED = 2**64 - 1


class Cancelled(Exception):
    """Raised by a progress callback to stop a run; samplers let it (and anything else a callback raises) propagate."""


# --------------------------------------------------------------------------------------------------------------------
# Model sampling


def time_snr_shift(shift: float, t):
    """comfy.model_sampling.time_snr_shift: shift * t / (1 + (shift - 1) * t), in t's own precision."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class ModelSampling:
    """ComfyUI ModelSamplingDiscreteFlow (CONST) with Anima's shift 3 and multiplier 1."""

    def __init__(self, shift: float = 3.0, multiplier: float = 1.0, timesteps: int = 1000):
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        # int64 arange / int -> float32 true division, as ComfyUI builds it; sigmas[k] = sigma((k + 1) / 1000)
        t = torch.arange(1, timesteps + 1, 1) / timesteps * self.multiplier
        self.sigmas = self.sigma(t)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        # a Python double, never a float32 table value: the SA-Solver tau bounds compare against it as a double
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)


# --------------------------------------------------------------------------------------------------------------------
# Schedules: float32 1-D tensors [steps + 1] ending in 0 (beta may drop duplicates)


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def _float32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def _rounded(values) -> torch.Tensor:
    # double values rounded once to float32: for pow and exp, the correctly rounded float32 result
    return torch.tensor(list(values), dtype=torch.float32)


def _linspace(start: float, end: float, steps: int) -> torch.Tensor:
    """torch.linspace(start, end, steps) in float32 by ATen's vectorised CPU rule (spec/sampling.md §1.5), which
    ComfyUI's schedules ran on, rather than by whichever kernel this torch build has."""
    start, end = _float32(start), _float32(end)
    if steps == 1:
        return torch.tensor([start])
    step = _float32(_float32(end - start) / (steps - 1))
    half = steps // 2
    # step * i is exact in double and so is the sum for the schedules' endpoints: one rounding, as the fused
    # multiply-add makes
    return _rounded(start + step * i if i < half else end - step * (steps - 1 - i) for i in range(steps))


def schedule_simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    """ComfyUI simple_scheduler: every (1000/steps)-th table entry from the top, truncated indices."""
    stride = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def _normal(ms: ModelSampling, steps: int, sgm: bool) -> torch.Tensor:
    start = ms.timestep(ms.sigma_max)
    end = ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        ts = _linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        ts = _linspace(float(start), float(end), steps)
    # sigma(timestep(sigma_min)) applies the shift a second time: last non-zero sigma is 0.00893, as in ComfyUI
    sigs = [float(ms.sigma(t)) for t in ts]
    return torch.tensor(sigs + ([0.0] if append_zero else []), dtype=torch.float32)


def schedule_normal(ms: ModelSampling, steps: int) -> torch.Tensor:
    """ComfyUI normal_scheduler: timesteps linear from timestep(sigma_max) to timestep(sigma_min), mapped by sigma()."""
    return _normal(ms, steps, sgm=False)


def schedule_sgm_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    """ComfyUI normal_scheduler(sgm=True): steps + 1 linear timesteps with the last one dropped."""
    return _normal(ms, steps, sgm=True)


def schedule_karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """k-diffusion get_sigmas_karras (Karras et al. 2022, eq. 5) between the table's sigma_min and sigma_max."""
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    ramp = _linspace(0.0, 1.0, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    base = max_inv_rho + ramp * (min_inv_rho - max_inv_rho)  # float32, as ComfyUI; IEEE * and + agree on any build
    # ComfyUI's float32 torch pow varies in the last bit with the build and CPU (torch 2.13's AVX2 kernel is 1 ulp off
    # one of the 30-step sigmas); the reference sigmas are the correctly rounded ones
    return _append_zero(_rounded(float(b) ** rho for b in base))


def schedule_exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    """k-diffusion get_sigmas_exponential: log-linear from sigma_max to sigma_min."""
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    log_sigmas = _linspace(math.log(sigma_max), math.log(sigma_min), steps)
    return _append_zero(_rounded(math.exp(float(t)) for t in log_sigmas))  # exp rounded once, as karras's pow


def _betainc(a: float, b: float, x: float) -> float:
    # Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes §6.4), double precision.
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    # Inverse of I_x(a, b) by bisection to double resolution (scipy.stats.beta.ppf without scipy).
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    # only rint(ppf * 999) is used, so 1e-14 absolute is far more than enough
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-14:
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def schedule_beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI beta_scheduler (Lee et al. 2024, "Beta Sampling is All You Need"): table indices at beta quantiles."""
    total = len(ms.sigmas) - 1
    sigs, last = [], -1.0
    for i in range(steps):
        # numpy: 1 - linspace(0, 1, steps, endpoint=False), then rint (round half to even, as Python's round)
        t = float(round(_beta_ppf(1.0 - i * (1.0 / steps), alpha, beta) * total))
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def schedule_linear_quadratic(
    ms: ModelSampling, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """ComfyUI linear_quadratic_schedule (from Mochi / genmo): linear then quadratic; ignores the shift."""
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        q = step_diff / (linear_steps * quadratic_steps**2)
        li = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps**2)
        c = q * (linear_steps**2)
        quad = [q * (i**2) + li * i + c for i in range(linear_steps, steps)]
        sched = [1.0 - v for v in lin + quad + [1.0]]
    return torch.tensor(sched, dtype=torch.float32) * ms.sigma_max


SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": schedule_simple,
    "normal": schedule_normal,
    "karras": schedule_karras,
    "exponential": schedule_exponential,
    "sgm_uniform": schedule_sgm_uniform,
    "beta": schedule_beta,
    "linear_quadratic": schedule_linear_quadratic,
}


def _unknown(kind: str, name: str, valid) -> ConfigError:
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def get_sigmas(scheduler: str, steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI KSampler.set_steps: the named schedule, or its last steps + 1 values for a partial denoise."""
    if scheduler not in SCHEDULERS:
        raise _unknown("scheduler", scheduler, SCHEDULERS)
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    ms = ModelSampling(shift=shift)
    if denoise is None or denoise > 0.9999:
        return SCHEDULERS[scheduler](ms, steps)
    if denoise <= 0.0:
        return torch.zeros([0], dtype=torch.float32)
    return SCHEDULERS[scheduler](ms, int(steps / denoise))[-(steps + 1):]


# --------------------------------------------------------------------------------------------------------------------
# Seeds and noise


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


def initial_noise(seed: int, shape) -> torch.Tensor:
    """ComfyUI prepare_noise: CPU manual_seed(seed) + float32 randn, so a seed gives the same noise on any device.

    MT19937 takes only the low 32 bits of the seed (seed and seed + 2**32 give the same noise).
    """
    g = torch.Generator(device="cpu").manual_seed(_check_seed(seed))
    return torch.randn(tuple(shape), dtype=torch.float32, device="cpu", generator=g)


def noise_scaling(sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """comfy CONST.noise_scaling: sigma * noise + (1 - sigma) * latent (txt2img at sigma 1: exactly the noise)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=noise.device)
    sigma = sigma.reshape(sigma.shape[:1] + (1,) * (noise.ndim - sigma.ndim))
    return sigma * noise + (1.0 - sigma) * latent


def inverse_noise_scaling(sigma, x: torch.Tensor) -> torch.Tensor:
    """comfy CONST.inverse_noise_scaling: x / (1 - sigma_last); a run stopped early returns its rescaled state."""
    return x / (1.0 - sigma)


def prepare_latent(seed: int, latent: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The sampler's start state: CPU noise for the seed, noise-scaled to sigmas[0] on the latent's device (fp32)."""
    if len(sigmas) == 0:
        return latent.float()
    noise = initial_noise(seed, latent.shape).to(latent.device)
    return noise_scaling(sigmas[0], noise, latent.float())


def default_noise_sampler(x: torch.Tensor, seed: int) -> NoiseSampler:
    """ComfyUI default_noise_sampler: one generator on x's device for the whole run, seed + 1 on CPU, seed on CUDA.

    On CPU ComfyUI's seed + 1 overflows at seed 2**64 - 1; it is wrapped to 0 here, which gives the stream ComfyUI's
    CPU generator would have used (MT19937 keeps the low 32 bits).
    """
    _check_seed(seed)
    if x.device.type == "cpu":
        seed = (seed + 1) % 2**64
    g = torch.Generator(device=x.device).manual_seed(seed)

    def sampler(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=g)

    return sampler


class BrownianTreeNoiseSampler:
    """ComfyUI BrownianTreeNoiseSampler(cpu=True): one torchsde BrownianTree (entropy = seed) on CPU for the batch."""

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int):
        import torchsde  # only dpmpp_2m_sde needs it

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x)
        self.tree = torchsde.BrownianTree(
            t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu(), entropy=_check_seed(seed)
        )

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        t0, t1, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        device, dtype = t0.device, t0.dtype
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to 6 decimals, so a query at sigma_min can fall just outside and is
            # clamped with a warning; harmless, and ComfyUI gets the same numbers
            warnings.filterwarnings("ignore", message="Should have ta>=t0", category=UserWarning)
            w = self.tree(t0.detach().cpu().float(), t1.detach().cpu().float()) * (self.sign * sign)
        return w.to(device=device, dtype=dtype) / (t1 - t0).abs().sqrt()


# --------------------------------------------------------------------------------------------------------------------
# Helpers shared by the samplers


def _t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    # k-diffusion's t = -log(sigma), the time of DPM-Solver++ and RES
    return sigma.log().neg()


def _sigma_of_t(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    # lambda = log(alpha / sigma) = -logit(sigma) for CONST models
    return sigma.logit().neg()


def _offset_first_sigma(sigmas: torch.Tensor, ms: ModelSampling, percent_offset: float = 1e-4) -> torch.Tensor:
    # ComfyUI offset_first_sigma_for_snr: sigma 1.0 has lambda = -inf, so start at percent_to_sigma(1e-4), which is
    # 0.99996668 at shift 3 (the double rounded into the sigma tensor); x itself was built with sigma 1.0
    if len(sigmas) <= 1 or not sigmas[0] >= 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = ms.percent_to_sigma(percent_offset)
    return sigmas


def _emit(callback, i, sigma, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


# --------------------------------------------------------------------------------------------------------------------
# Samplers: model(x, sigma[B]) -> denoised; return the final state


def sample_euler(model: Denoiser, x, sigmas, *, callback=None, noise_sampler=None):
    """k-diffusion sample_euler (Karras et al. 2022, Algorithm 2, s_churn = 0); for flow models this is DDIM."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        _emit(callback, i, sigmas[i], x, denoised)
    return x


def sample_euler_ancestral(model: Denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """ComfyUI sample_euler_ancestral_RF: ancestral Euler with the rectified-flow re-noise (alpha = 1 - sigma)."""
    if noise_sampler is None and eta > 0:
        raise ConfigError("euler_ancestral needs a noise sampler; call sampling.sample(...) with a seed")
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
        _emit(callback, i, sigmas[i], x, denoised)
    return x


def sample_dpmpp_2m(model: Denoiser, x, sigmas, *, callback=None, noise_sampler=None):
    """k-diffusion sample_dpmpp_2m: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) in t = -log sigma."""
    s_in = x.new_ones([x.shape[0]])

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = _t_of_sigma(sigmas[i]), _t_of_sigma(sigmas[i + 1])
        h = t_next - t
        # _sigma_of_t(t_next) / _sigma_of_t(t), not sigmas[i+1] / sigmas[i]: they differ in the last bit on some steps
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_of_t(t_next) / _sigma_of_t(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_of_sigma(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_of_t(t_next) / _sigma_of_t(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        _emit(callback, i, sigmas[i], x, denoised)
    return x


def sample_dpmpp_2m_sde(
    model: Denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
    model_sampling: ModelSampling | None = None,
):
    """ComfyUI sample_dpmpp_2m_sde: DPM-Solver++(2M) SDE (Lu et al. 2022) in half-log-SNR, RF alpha = 1 - sigma."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ConfigError(f"dpmpp_2m_sde solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    if noise_sampler is None and eta > 0 and s_noise > 0:
        raise ConfigError("dpmpp_2m_sde needs a noise sampler; call sampling.sample(...) with a seed")
    s_in = x.new_ones([x.shape[0]])
    sigmas = _offset_first_sigma(sigmas, model_sampling or ModelSampling())
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    coeff = (-h_eta).expm1().neg() / (-h_eta) + 1
                    x = x + alpha_t * coeff * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                z = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + z * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
        _emit(callback, i, sigmas[i], x, denoised)
    return x


def _er_sde_noise_scaler(x):
    return x * ((x**0.3).exp() + 10.0)


def sample_er_sde(
    model: Denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    s_noise=1.0,
    noise_scaler=None,
    max_stage=3,
    model_sampling: ModelSampling | None = None,
):
    """ComfyUI sample_er_sde: ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169), VP form with ell = sigma/alpha."""
    if noise_sampler is None and s_noise > 0:
        raise ConfigError("er_sde needs a noise sampler; call sampling.sample(...) with a seed")
    s_in = x.new_ones([x.shape[0]])
    noise_scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    num_points = 200.0
    # float32 quadrature points even for float64 sigmas, as ComfyUI
    point_indice = torch.arange(0, num_points, dtype=torch.float32, device=x.device)
    sigmas = _offset_first_sigma(sigmas, model_sampling or ModelSampling())
    er_lambdas = _half_log_snr(sigmas).neg().exp()  # sigma / alpha; 0 at sigma = 0
    old_denoised, old_denoised_d = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s = sigmas[i] / er_lambda_s
            alpha_t = sigmas[i + 1] / er_lambda_t
            r_alpha = alpha_t / alpha_s
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised
            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / num_points
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = noise_scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3:
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                amp = (er_lambda_t**2 - er_lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * amp
        old_denoised = denoised
        _emit(callback, i, sigmas[i], x, denoised)
    return x


def sample_res_multistep(model: Denoiser, x, sigmas, *, callback=None, noise_sampler=None, s_noise=1.0):
    """ComfyUI sample_res_multistep (eta 0): RES second-order multistep (Zhang et al., arXiv 2308.02157)."""
    s_in = x.new_ones([x.shape[0]])

    def phi1_fn(t):
        return torch.expm1(t) / t

    def phi2_fn(t):
        return (phi1_fn(t) - 1.0) / t

    old_sigma_down, old_denoised = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        # get_ancestral_step with eta 0: sigma_down = sigma_next, sigma_up = 0
        sigma_down, sigma_up = sigmas[i + 1], 0.0
        if sigma_down == 0 or old_denoised is None:
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_old = _t_of_sigma(sigmas[i]), _t_of_sigma(old_sigma_down)
            t_next, t_prev = _t_of_sigma(sigma_down), _t_of_sigma(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = _sigma_of_t(h) * x + h * (b1 * denoised + b2 * old_denoised)
        # ComfyUI draws here and multiplies by sigma_up = 0: the draw is consumed, x does not change
        if sigmas[i + 1] > 0 and noise_sampler is not None:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
        _emit(callback, i, sigmas[i], x, denoised)
    return x


# --- SA-Solver coefficients (ComfyUI comfy/k_diffusion/sa_solver.py; Xue et al. 2023, arXiv 2309.05019)


def _exponential_coeffs(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    # I_p = a * int_s^t exp(a (l - t)) l^p dl for p < order, a = 1 + tau^2, by repeated integration by parts:
    # I = M @ P with P_k = t^k - s^k exp(-a h) and M[p, k] = (-1)^(p-k) p!/k! a^-(p-k) (lower triangular)
    tau_mul = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    product_terms = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_fact = (p + 1).lgamma()
    coeff = log_fact.unsqueeze(1) - log_fact.unsqueeze(0)
    if tau > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    coeff = (coeff.exp() * signs).tril()
    return coeff @ product_terms


def _sa_b_coeffs(sigma_next, lambdas, lambda_s, lambda_t, tau, simple_order_2=False, corrector=False):
    # b_j = alpha_t * a * int_{lambda_s}^{lambda_t} exp(a (l - lambda_t)) L_j(l) dl, L_j the Lagrange basis on lambdas
    k = lambdas.shape[0]
    alpha_t = sigma_next * lambda_t.exp()
    if simple_order_2 and k == 2:
        tau_mul = 1 + tau**2
        h = lambda_t - lambda_s
        if corrector:
            b_1 = alpha_t * (0.5 * tau_mul * h)
            b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
        else:
            b_2 = alpha_t * (0.5 * tau_mul * h**2) / (lambdas[-2] - lambda_s)
            b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
        return torch.stack([b_2, b_1])
    integrals = _exponential_coeffs(lambda_s, lambda_t, k, tau)
    vander_t = torch.vander(lambdas, k, increasing=True).T
    return alpha_t * torch.linalg.solve(vander_t, integrals)


def sample_sa_solver(
    model: Denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    tau_func=None,
    s_noise=1.0,
    predictor_order=3,
    corrector_order=4,
    use_pece=False,
    simple_order_2=False,
    model_sampling: ModelSampling | None = None,
):
    """ComfyUI sample_sa_solver: SA-Solver, stochastic Adams predictor-corrector (Xue et al., NeurIPS 2023)."""
    if len(sigmas) <= 1:
        return x
    s_in = x.new_ones([x.shape[0]])
    ms = model_sampling or ModelSampling()
    sigmas = _offset_first_sigma(sigmas, ms)
    lambdas = _half_log_snr(sigmas)
    if tau_func is None:
        # double bounds sigma(0.8) / sigma(0.2) against float32 sigmas widened to double, inclusive (spec §3)
        tau_func = sa_solver_tau_interval(ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8), eta=1.0)
    if noise_sampler is None and s_noise > 0 and any(tau_func(s) > 0 for s in sigmas[1:]):
        raise ConfigError("sa_solver needs a noise sampler; call sampling.sample(...) with a seed")
    max_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau_t, noise = 0.0, 0.0, 0.0
    preds: list[torch.Tensor] = []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in)
        preds.append(denoised)
        preds = preds[-max_order:]
        p_order = min(predictor_order, len(preds))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            c_order = 0
        else:
            c_order = min(corrector_order, len(preds))
        if lower_order_to_end:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)

        # corrector: redo sigma_{i-1} -> sigma_i with the fresh evaluation among the nodes (Adams-Moulton)
        if c_order == 0:
            x = x_pred
        else:
            b = _sa_b_coeffs(
                sigmas[i], lambdas[i - c_order + 1 : i + 1], lambdas[i - 1], lambdas[i], tau_t, simple_order_2, True
            )
            pred_mat = torch.stack(preds[-c_order:], dim=1)  # (B, K, ...)
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + torch.tensordot(pred_mat, b, dims=([1], [0]))
            if tau_t > 0 and s_noise > 0:
                x = x + noise  # the same noise the predictor added
            if use_pece:
                denoised = model(x, sigmas[i] * s_in)
                preds[-1] = denoised

        # predictor: sigma_i -> sigma_{i+1} (Adams-Bashforth)
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = _sa_b_coeffs(
                sigmas[i + 1], lambdas[i - p_order + 1 : i + 1], lambdas[i], lambdas[i + 1], tau_t, simple_order_2
            )
            pred_mat = torch.stack(preds[-p_order:], dim=1)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + torch.tensordot(
                pred_mat, b, dims=([1], [0])
            )
            if tau_t > 0 and s_noise > 0:
                z = noise_sampler(sigmas[i], sigmas[i + 1])
                noise = z * sigmas[i + 1] * (-2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
        _emit(callback, i, sigmas[i], x_pred, denoised)
    return x_pred


def sa_solver_tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable[[object], float]:
    """ComfyUI sa_solver.get_tau_interval_func: tau = eta where start_sigma >= sigma >= end_sigma (doubles), else 0."""

    def tau_func(sigma) -> float:
        if eta <= 0:
            return 0.0
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0

    return tau_func


def sample_sa_solver_pece(model: Denoiser, x, sigmas, *, callback=None, noise_sampler=None, **options):
    """ComfyUI sample_sa_solver_pece: SA-Solver with the corrected state re-evaluated (PECE, 2N - 1 calls)."""
    return sample_sa_solver(model, x, sigmas, callback=callback, noise_sampler=noise_sampler, use_pece=True, **options)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and what KSampler gives it besides the model, x and sigmas.

    noise: "none" (deterministic), "gaussian" (default_noise_sampler) or "brownian" (a Brownian tree over the run).
    needs_model_sampling: the first-sigma offset (and SA-Solver's tau interval) come from the model's shift.
    """

    fn: Callable[..., torch.Tensor]
    noise: Literal["none", "gaussian", "brownian"]
    needs_model_sampling: bool = False


SAMPLERS: dict[str, SamplerSpec] = {
    "er_sde": SamplerSpec(sample_er_sde, "gaussian", needs_model_sampling=True),
    "sa_solver_pece": SamplerSpec(sample_sa_solver_pece, "gaussian", needs_model_sampling=True),
    "sa_solver": SamplerSpec(sample_sa_solver, "gaussian", needs_model_sampling=True),
    "euler": SamplerSpec(sample_euler, "none"),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral, "gaussian"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "none"),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, "brownian", needs_model_sampling=True),
    "res_multistep": SamplerSpec(sample_res_multistep, "gaussian"),
}


def _sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise _unknown("sampler", name, SAMPLERS)
    return SAMPLERS[name]


def make_noise_sampler(sampler_name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> NoiseSampler | None:
    """The per-step noise ComfyUI's KSampler gives the named sampler (None for the deterministic ones)."""
    noise = _sampler(sampler_name).noise
    if noise == "none":
        return None
    if noise == "brownian":
        # the tree spans the sigmas before the first-sigma offset, as ComfyUI builds it
        return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed)
    return default_noise_sampler(x, seed)


def sample(
    sampler_name: str,
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    seed: int,
    callback=None,
    shift: float = 3.0,
    **options,
) -> torch.Tensor:
    """ComfyUI KSAMPLER.sample from the noise-scaled x (prepare_latent): the sampler, its noise, x / (1 - sigma_N).

    `shift` must be the one the sigmas were made with: the first-sigma offset and SA-Solver's tau interval use it.
    """
    spec = _sampler(sampler_name)
    if len(sigmas) <= 1:
        return x
    sigmas = sigmas.to(x.device)
    noise_sampler = make_noise_sampler(sampler_name, x, sigmas, seed)
    if spec.needs_model_sampling:
        options = {"model_sampling": ModelSampling(shift), **options}
    out = spec.fn(model, x, sigmas, callback=callback, noise_sampler=noise_sampler, **options)
    return inverse_noise_scaling(sigmas[-1], out)


# --------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


@dataclass(frozen=True)
class NAGGuidance:
    """Normalized Attention Guidance for CFGDenoiser, as ComfyUI-NAG-Extended's KSamplerWithNAG runs it on Anima (the
    newsletternewsletter fork, which fixes the released pack): `negative` is a context made like the prompt's (adapter,
    padded to 512), `guide` the per-cross-attention rule (engine.NAG). It guides the cond rows only, and only for model
    calls whose sigma (the one the model receives) lies in [sigma_end, sigma_start]."""

    negative: torch.Tensor
    guide: object
    sigma_start: float
    sigma_end: float

    def active(self, sigma: torch.Tensor) -> bool:
        # float32 comparisons, as the node compares its Python bounds with the model's sigma tensor
        return bool(((sigma >= self.sigma_end) & (sigma <= self.sigma_start)).all())


class CFGDenoiser:
    """ComfyUI sampling_function + cfg_function: velocity model -> denoised, with CFG on the denoised predictions.

    model_fn(x [N, ...], sigma [N], context [N, ...]) -> v. cond/uncond are contexts with batch 1 or B. A model that
    has `prepare_context` (the DiT) gets the prepared cross-attention K/V instead, made here once per generation:
    model_fn(x, sigma, kv=model_fn.prepare_context(context)). At cfg 1 the uncond branch is skipped (ComfyUI's cfg1
    optimisation, which returns cond * cfg); otherwise one call on [uncond, cond] batched along dim 0, uncond first,
    as ComfyUI batches them. With `nag` (such a model only), the call holding the cond rows also gets
    nag=nag.guide, nag_kv=the negative's K/V (prepared once too) while the sigma is in its window.
    """

    def __init__(self, model_fn, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float,
                 nag: NAGGuidance | None = None):
        self.model_fn = model_fn
        self.cond = cond
        self.uncond = uncond
        self.cfg = float(cfg)
        self.skip_uncond = math.isclose(self.cfg, 1.0)
        if not self.skip_uncond and uncond is None:
            raise ConfigError(f"CFG {cfg} needs a negative conditioning (only CFG 1 runs without one)")
        self.nag = nag
        self._nag_kv = None
        if nag is not None:
            prepare = getattr(model_fn, "prepare_context", None)
            if prepare is None:
                raise ConfigError("NAG needs a model whose cross-attention K/V can be prepared (the Anima DiT)")
            self._nag_kv = prepare(nag.negative)
        self._inputs: tuple[int, list[dict], list[dict]] | None = None
        self._model_inputs(cond.shape[0])

    @staticmethod
    def _expand(ctx: torch.Tensor, b: int) -> torch.Tensor:
        return ctx.expand(b, *ctx.shape[1:]) if ctx.shape[0] == 1 and b != 1 else ctx

    def _model_inputs(self, b: int, guided: bool = False) -> list[dict]:
        # The conditioning keywords of each model call for a batch of b latents, in call order, without and with NAG;
        # made again only if a sampler changes the batch size.
        if self._inputs is None or self._inputs[0] != b:
            cond = self._expand(self.cond, b)
            if self.skip_uncond:
                contexts = [cond]
            elif cond.shape[1:] != self.uncond.shape[1:]:
                # A prompt past 512 T5 tokens is not padded, so the two contexts cannot share a batch: ComfyUI then
                # runs them one after the other, uncond first.
                contexts = [self._expand(self.uncond, b), cond]
            else:
                contexts = [torch.cat([self._expand(self.uncond, b), cond])]
            prepare = getattr(self.model_fn, "prepare_context", None)
            plain = [{"context": c} if prepare is None else {"kv": prepare(c)} for c in contexts]
            with_nag = plain
            if self._nag_kv is not None:  # the last call holds the cond rows, last in its batch
                neg = [(k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])) for k, v in self._nag_kv]
                with_nag = [*plain[:-1], {**plain[-1], "nag": self.nag.guide, "nag_kv": neg}]
            self._inputs = (b, plain, with_nag)
        return self._inputs[2 if guided else 1]

    def _denoised(self, x, sigma, inputs):
        v = self.model_fn(x, sigma, **inputs)
        sigma = sigma.reshape(sigma.shape[:1] + (1,) * (v.ndim - 1))
        return x - v.float() * sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        inputs = self._model_inputs(b, self.nag is not None and self.nag.active(sigma))
        if self.skip_uncond:
            d_cond = self._denoised(x, sigma, inputs[0])
            # ComfyUI: 0 + (cond - 0) * cfg, which is exactly cond at cfg == 1.0
            return d_cond * self.cfg if self.cfg != 1.0 else d_cond
        if len(inputs) == 2:
            d_uncond, d_cond = (self._denoised(x, sigma, i) for i in inputs)
            return d_uncond + (d_cond - d_uncond) * self.cfg
        d = self._denoised(torch.cat([x, x]), torch.cat([sigma, sigma]), inputs[0])
        d_uncond, d_cond = d[:b], d[b:]
        return d_uncond + (d_cond - d_uncond) * self.cfg


# --------------------------------------------------------------------------------------------------------------------
# Inpainting


def latent_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    """ComfyUI reshape_mask for a 5-D latent: a pixel mask [.., H, W] to the latent grid by trilinear interpolation
    (no antialiasing: each cell takes the central 2x2 pixels of its 8x8 block), repeated over the channels."""
    m = mask.float().reshape(1, 1, -1, *mask.shape[-2:])
    m = torch.nn.functional.interpolate(m, size=tuple(shape[2:]), mode="trilinear")  # [1, 1, T, h, w]
    return m.repeat(shape[0], shape[1], 1, 1, 1)


class MaskedDenoiser:
    """ComfyUI KSamplerX0Inpaint: where mask m < 1 the model sees, and the step keeps, the input latent.

    At each call with sigma s: x_in = x*m + (s*noise + (1 - s)*latent)*(1 - m) with the run's initial noise, then
    denoised*m + latent*(1 - m). mask [B, C, T, h, w] in [0, 1] (1 = repaint); latent in model space.
    """

    def __init__(self, model: Denoiser, mask: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor):
        self.model, self.mask, self.noise, self.latent = model, mask, noise, latent
        self.keep = 1.0 - mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = x * self.mask + noise_scaling(sigma, self.noise, self.latent) * self.keep
        return self.model(x, sigma) * self.mask + self.latent * self.keep
