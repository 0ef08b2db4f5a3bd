"""Tests for latte.diffusion: schedules, likelihoods, the Gaussian diffusion, respacing and the samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latte.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)

SHAPE = (2, 3, 4, 4, 4)  # (N, F, C, H, W)
C = SHAPE[2]


def fake_model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
    """Deterministic stand-in for Latte: (N, F, C, H, W) -> (N, F, 2C, H, W)."""
    tt = t.float().view(-1, 1, 1, 1, 1) / 1000.0
    return torch.cat([0.3 * torch.sin(x + tt), torch.tanh(x - tt)], dim=2)


def fake_model_fixed_var(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
    """Same as ``fake_model`` but without the variance channels: (N, F, C, H, W)."""
    return fake_model(x, t)[:, :, : x.shape[2]]


def point_mass_oracle(x0: torch.Tensor, alphas_cumprod: np.ndarray):
    """Exact eps-predictor for data that is always ``x0``; expects ORIGINAL timestep indices."""

    def model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        abar = torch.from_numpy(alphas_cumprod)[t].view(-1, 1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1, 1), float64
        eps = (x.double() - abar.sqrt() * x0.double()) / (1.0 - abar).sqrt()
        return torch.cat([eps.float(), torch.zeros_like(x)], dim=2)  # (N, F, 2C, H, W)

    return model


# ---------------------------------------------------------------------------- schedules


def test_linear_schedule():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.alphas_cumprod.dtype == np.float64
    assert np.all(np.diff(d.alphas_cumprod) < 0) and 0 < d.alphas_cumprod[-1] < 1e-4
    # Scaled by 1000 / T for other lengths.
    assert get_named_beta_schedule("linear", 500)[-1] == pytest.approx(0.04)


def test_cosine_schedule():
    betas = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    assert np.all(np.diff(np.cumprod(1 - betas)) < 0)
    with pytest.raises(NotImplementedError):
        get_named_beta_schedule("nope", 10)


# ---------------------------------------------------------------------------- forward process / posterior


@pytest.mark.parametrize("t_val", [0, 10, 500, 999])
def test_q_sample_moments(t_val: int):
    d = create_diffusion("")
    n = 20000
    x0 = torch.full((n,), 0.7)
    t = torch.full((n,), t_val, dtype=torch.long)
    torch.manual_seed(1234)
    xt = d.q_sample(x0, t).double()
    abar = d.alphas_cumprod[t_val]
    mean, var = math.sqrt(abar) * 0.7, 1.0 - abar
    # 5 standard errors: se(mean) = sqrt(var / n), se(var) ~= var * sqrt(2 / (n - 1)) for Gaussian data.
    assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))
    m, v, lv = d.q_mean_variance(x0[:4], t[:4])
    assert torch.allclose(m, torch.full((4,), mean, dtype=torch.float32))
    assert torch.allclose(v, torch.full((4,), var, dtype=torch.float32))
    assert torch.allclose(lv, torch.full((4,), math.log(var), dtype=torch.float32))


def test_posterior_matches_bayes():
    d = create_diffusion("")
    betas = get_named_beta_schedule("linear", 1000)
    abar = np.cumprod(1.0 - betas)
    ts = np.arange(1, 1000)
    # Multiply the two Gaussians in x_{t-1}: q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    # and q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t).
    prec = 1.0 / (1.0 - abar[ts - 1]) + (1.0 - betas[ts]) / betas[ts]
    var = 1.0 / prec
    coef_x0 = var * np.sqrt(abar[ts - 1]) / (1.0 - abar[ts - 1])
    coef_xt = var * np.sqrt(1.0 - betas[ts]) / betas[ts]
    np.testing.assert_allclose(d.posterior_variance[ts], var, rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef1[ts], coef_x0, rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef2[ts], coef_xt, rtol=1e-10)
    # And through the tensor API.
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for tv in (1, 37, 999):
        t = torch.full((SHAPE[0],), tv)
        mean, pvar, plv = d.q_posterior_mean_variance(x0, xt, t)
        expected = coef_x0[tv - 1] * x0.double() + coef_xt[tv - 1] * xt.double()
        assert torch.allclose(mean.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(pvar.double(), torch.full(SHAPE, var[tv - 1], dtype=torch.float64), rtol=1e-6)
        assert torch.allclose(plv.double(), torch.full(SHAPE, math.log(var[tv - 1]), dtype=torch.float64))
    # t = 0: the posterior collapses onto x0; its log variance is clipped to the t = 1 value.
    mean0, var0, _ = d.q_posterior_mean_variance(x0, xt, torch.zeros(SHAPE[0], dtype=torch.long))
    assert torch.allclose(mean0, x0) and torch.all(var0 == 0)
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    np.testing.assert_array_equal(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))


def test_eps_xstart_roundtrip():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 700])
    xt = d.q_sample(x0, t, noise=eps)
    assert torch.allclose(d._predict_xstart_from_eps(xt, t, eps), x0, atol=1e-4)
    assert torch.allclose(d._predict_eps_from_xstart(xt, t, x0), eps, atol=1e-4)


# ---------------------------------------------------------------------------- likelihoods / VB


def test_normal_kl():
    g = torch.Generator().manual_seed(0)
    m, lv = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-6  # zero up to float32 rounding
    m2, lv2 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert torch.all(normal_kl(m, lv, m2, lv2) >= 0)
    # Closed form against a scalar second argument: KL(N(1, 1) || N(0, 1)) = 0.5.
    assert normal_kl(torch.tensor(1.0), 0.0, 0.0, 0.0).item() == pytest.approx(0.5)


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, math.log(0.1)), (0.37, math.log(0.01)), (-0.9, 0.0)])
def test_discretized_likelihood_sums_to_one(mean: float, log_scale: float):
    x = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)  # the 256 bin centres
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, log_scale)
    logp = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert logp.shape == x.shape and torch.all(logp <= 0)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_vb_terms_nonnegative():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    out = torch.randn(SHAPE[0], SHAPE[1], 2 * C, *SHAPE[3:], generator=g)
    out[:, :, C:] = out[:, :, C:].clamp(-1, 1)

    def random_model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        return out

    for tv in (0, 1, 250, 999):
        t = torch.full((SHAPE[0],), tv)
        xt = d.q_sample(x0, t)
        vb = d._vb_terms_bpd(random_model, x0, xt, t, clip_denoised=False)["output"]
        assert vb.shape == (SHAPE[0],)
        assert torch.all(vb > 0) if tv == 0 else torch.all(vb >= 0)
        if tv == 0:  # the decoder NLL -log p(x0 | x1) in bits/dim
            p = d.p_mean_variance(random_model, xt, t, clip_denoised=False)
            nll = -discretized_gaussian_log_likelihood(
                x0, means=p["mean"], log_scales=0.5 * p["log_variance"]
            )
            assert torch.allclose(vb, nll.mean(dim=(1, 2, 3, 4)) / math.log(2.0))


def test_learned_range_interpolates_log_variance():
    d = create_diffusion("")
    x = torch.zeros(SHAPE)
    t = torch.tensor([1, 500])
    for v, arr in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):

        def model(x_: torch.Tensor, t_: torch.Tensor, v_: float = v) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x_), torch.full_like(x_, v_)], dim=2)

        lv = d.p_mean_variance(model, x, t)["log_variance"]
        assert torch.allclose(lv[:, 0, 0, 0, 0], torch.from_numpy(arr[t.numpy()]).float())


# ---------------------------------------------------------------------------- respacing


def test_space_timesteps():
    assert len(space_timesteps(1000, "250")) == 250
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, [1000]) == set(range(1000))
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 15
    assert steps[0] == 0 and steps[-1] == 299
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError):
        space_timesteps(30, "11,11,11")


@pytest.mark.parametrize("spacing", ["250", "ddim50", "10,10,10"])
def test_spaced_alphas_cumprod_match(spacing: str):
    base = create_diffusion("")
    spaced = create_diffusion(spacing)
    kept = sorted(space_timesteps(1000, spacing))
    assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=0, atol=1e-12)


def test_wrapped_model_receives_original_timesteps():
    d = create_diffusion("10")
    seen: list[list[int]] = []
    kwargs_seen: list[dict] = []

    def recorder(x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(t.tolist())
        kwargs_seen.append(dict(kwargs))
        return fake_model(x, t)

    x0 = torch.zeros(SHAPE)
    d.training_losses(recorder, x0, torch.tensor([0, 9]), model_kwargs={"y": 3})
    assert seen == [[0, 999]] and kwargs_seen == [{"y": 3}]
    seen.clear()
    d.ddim_sample_loop(
        recorder, SHAPE, model_kwargs={"cfg_scale": 4.0}, generator=torch.Generator().manual_seed(0)
    )
    expected = sorted(space_timesteps(1000, "10"), reverse=True)
    assert [s[0] for s in seen] == expected and all(s[0] == s[1] for s in seen)
    assert kwargs_seen[-1] == {"cfg_scale": 4.0}


# ---------------------------------------------------------------------------- training losses


def test_training_losses_shapes_and_keys():
    d = create_diffusion("")
    assert d.loss_type == LossType.MSE and d.model_var_type == ModelVarType.LEARNED_RANGE
    x0 = torch.randn(SHAPE)
    terms = d.training_losses(fake_model, x0, torch.tensor([0, 999]))
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (SHAPE[0],) and torch.isfinite(v).all() for v in terms.values())
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_training_losses_oracle_mse_zero():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)

    def oracle(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.cat([noise, torch.zeros_like(noise)], dim=2)  # eps in channels [0, C), var values after

    terms = d.training_losses(oracle, x0, torch.tensor([5, 600]), noise=noise)
    assert torch.all(terms["mse"] < 1e-12)


def test_vb_trains_only_variance_channels():
    d = create_diffusion("")
    x0 = torch.rand(SHAPE) * 2 - 1
    out = (torch.randn(SHAPE[0], SHAPE[1], 2 * C, *SHAPE[3:]) * 0.5).requires_grad_(True)

    def model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        return out * 1.0

    d.training_losses(model, x0, torch.tensor([0, 400]))["vb"].sum().backward()
    assert out.grad is not None
    assert torch.all(out.grad[:, :, :C] == 0) and out.grad[:, :, C:].abs().sum() > 0
    out.grad = None
    d.training_losses(model, x0, torch.tensor([0, 400]))["mse"].sum().backward()
    assert torch.all(out.grad[:, :, C:] == 0) and out.grad[:, :, :C].abs().sum() > 0


def test_fixed_variance_has_no_vb():
    d = create_diffusion("", learn_sigma=False)
    assert d.model_var_type == ModelVarType.FIXED_LARGE
    terms = d.training_losses(fake_model_fixed_var, torch.randn(SHAPE), torch.tensor([1, 2]))
    assert set(terms) == {"loss", "mse"} and torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(AssertionError):  # a 2C output is wrong for a fixed-variance diffusion
        d.training_losses(fake_model, torch.randn(SHAPE), torch.tensor([1, 2]))


def test_learned_variance_shape_is_asserted():
    d = create_diffusion("")
    with pytest.raises(AssertionError):
        d.training_losses(fake_model_fixed_var, torch.randn(SHAPE), torch.tensor([1, 2]))


def test_previous_x_mean_type_recovers_xstart():
    base = create_diffusion("", learn_sigma=False)
    d = GaussianDiffusion(
        betas=base.betas,
        model_mean_type=ModelMeanType.PREVIOUS_X,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 200])
    posterior_mean = d.q_posterior_mean_variance(x0, xt, t)[0]
    out = d.p_mean_variance(lambda x, t_: posterior_mean, xt, t, clip_denoised=False)
    assert torch.equal(out["mean"], posterior_mean)
    assert torch.allclose(out["pred_xstart"], x0, atol=1e-3)


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_shape_and_seed_determinism(loop: str):
    d = create_diffusion("10")
    sample = getattr(d, loop)

    def run(seed: int) -> torch.Tensor:
        return sample(fake_model, SHAPE, clip_denoised=False, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == SHAPE and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ddim_eta0_deterministic_given_noise():
    d = create_diffusion("ddim10")
    z = torch.randn(SHAPE)
    a = d.ddim_sample_loop(fake_model, SHAPE, z.clone(), generator=torch.Generator().manual_seed(0))
    b = d.ddim_sample_loop(fake_model, SHAPE, z.clone(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # With eta > 0 the generator matters.
    c = d.ddim_sample_loop(fake_model, SHAPE, z.clone(), eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_progressive_yields_every_step_and_progress_bar(capsys: pytest.CaptureFixture[str]):
    d = create_diffusion("5")
    steps = list(d.p_sample_loop_progressive(fake_model, SHAPE, progress=True))
    assert len(steps) == 5 and all(set(s) == {"sample", "pred_xstart"} for s in steps)
    assert "5/5" in capsys.readouterr().err


@pytest.mark.parametrize(("spacing", "loop"), [("ddim10", "ddim_sample_loop"), ("50", "p_sample_loop")])
def test_oracle_point_mass_recovers_x0(spacing: str, loop: str):
    base = create_diffusion("")
    d = create_diffusion(spacing)
    assert isinstance(d, SpacedDiffusion)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) * 1.8 - 0.9
    oracle = point_mass_oracle(x0, base.alphas_cumprod)
    out = getattr(d, loop)(oracle, SHAPE, generator=torch.Generator().manual_seed(0))
    assert (out - x0).abs().max().item() < 1e-3


def test_cfg_style_bound_method_model():
    """Samplers accept ``model.forward_with_cfg`` (a bound method) and infer the device from its module."""

    class TinyLatte(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cfg_scale: float = 1.0) -> torch.Tensor:
            return fake_model(x * self.scale * cfg_scale, t)

    net = TinyLatte()
    d = create_diffusion("ddim5")
    out = d.ddim_sample_loop(
        net.forward_with_cfg, SHAPE, model_kwargs={"cfg_scale": 2.0}, clip_denoised=False
    )
    assert out.shape == SHAPE and out.device == net.scale.device and not out.requires_grad
