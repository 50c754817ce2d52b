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
