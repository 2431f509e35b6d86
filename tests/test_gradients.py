"""The gradient policies, proven against finite differences and an independently computed closed form."""

import pytest
import torch
from tiny_models import ddim, tiny_cond_unet
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

import diffusion_shortcuts as ds
from diffusion_shortcuts import gradients as G

STEPS = 4


def make_sampler(scheduler, steps=STEPS, guidance=2.0, dtype=torch.float64, **kwargs):
    unet = tiny_cond_unet().to(dtype)
    gen = torch.Generator().manual_seed(5)
    uncond = torch.randn(1, 3, 8, generator=gen, dtype=dtype)
    return ds.Sampler(unet, scheduler, steps, guidance_scale=guidance, uncond=uncond, **kwargs)


def inputs(batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, 8, 8, generator=gen, dtype=dtype)
    cond = torch.randn(batch, 3, 8, generator=gen, dtype=dtype)
    weights = torch.randn(batch, 1, 8, 8, generator=gen, dtype=dtype)
    return noise, cond, weights


def reward(images, weights):
    """A nonlinear differentiable reward of the final sample."""
    return (images * weights).sum() + 0.3 * (images ** 2 * weights.abs()).sum()


def cosine_ddim():
    return ddim(beta_schedule="squaredcos_cap_v2")


def grads(sampler, policy, noise, cond, weights, param):
    x = noise.clone().requires_grad_(True)
    c = cond.clone().requires_grad_(True)
    param.grad = None
    out = sampler(x, c, gradient=policy, generator=torch.Generator().manual_seed(11))
    reward(out, weights).backward()
    gp = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
    return (x.grad if x.grad is not None else torch.zeros_like(x),
            c.grad if c.grad is not None else torch.zeros_like(c), gp)


def assert_close_relative(actual, expected, tol=1e-5):
    """Relative error in norm: Euler and DPM-Solver upcast their arithmetic to float32 internally, so
    elementwise float64 tolerances would fail on entries near zero."""
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def central_difference(f, value, direction, h=1e-4):
    return (f(value + h * direction) - f(value - h * direction)) / (2 * h)


@pytest.fixture(scope="module")
def ddim_setup():
    sampler = make_sampler(cosine_ddim())
    noise, cond, weights = inputs()
    param = sampler.model.conv_in.weight
    return sampler, noise, cond, weights, param


def test_full_and_checkpointed_equal_and_match_finite_differences(ddim_setup):
    sampler, noise, cond, weights, param = ddim_setup
    gx, gc, gp = grads(sampler, G.Full(), noise, cond, weights, param)
    cx, cc, cp = grads(sampler, G.Checkpointed(), noise, cond, weights, param)
    for a, b in ((gx, cx), (gc, cc), (gp, cp)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(1)

    def r(x, c):
        with torch.no_grad():
            return reward(sampler(x, c), weights).item()

    d = torch.randn(noise.shape, generator=gen, dtype=noise.dtype)
    fd = central_difference(lambda v: r(v, cond), noise, d)
    assert fd == pytest.approx((gx * d).sum().item(), rel=1e-6)
    d = torch.randn(cond.shape, generator=gen, dtype=cond.dtype)
    fd = central_difference(lambda v: r(noise, v), cond, d)
    assert fd == pytest.approx((gc * d).sum().item(), rel=1e-6)
    d = torch.randn(param.shape, generator=gen, dtype=param.dtype)
    original = param.detach().clone()

    def r_param(v):
        with torch.no_grad():
            param.copy_(v)
        try:
            return r(noise, cond)
        finally:
            with torch.no_grad():
                param.copy_(original)

    fd = central_difference(r_param, original, d)
    assert fd == pytest.approx((gp * d).sum().item(), rel=1e-6)


def test_truncated_all_steps_equals_full(ddim_setup):
    sampler, noise, cond, weights, param = ddim_setup
    full = grads(sampler, G.Full(), noise, cond, weights, param)
    trunc = grads(sampler, G.Truncated(STEPS), noise, cond, weights, param)
    for a, b in zip(full, trunc):
        assert torch.equal(a, b)


def count_grad_calls(sampler, policy, noise, cond):
    calls = []
    handle = sampler.model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        sampler(noise.clone().requires_grad_(True), cond, gradient=policy, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return sum(calls), len(calls)


@pytest.mark.parametrize("policy,expected", [
    (G.Truncated(1), 1), (G.Truncated(3), 3), (G.Full(), STEPS), (G.Shortcut(), 1), (G.Shortcut("random"), 1),
    (G.Shortcut(2), 1), (G.StraightThrough(), 0), (G.RandomTruncated(2), None)])
def test_network_calls_with_grad_enabled(ddim_setup, policy, expected):
    sampler, noise, cond, _, _ = ddim_setup
    with_grad, total = count_grad_calls(sampler, policy, noise, cond)
    assert total == STEPS
    if expected is None:  # AlignProp: k drawn from 1..max_k
        k = G.RandomTruncated(2).draw_k(STEPS, torch.Generator().manual_seed(0))
        assert with_grad == k and 1 <= k <= 2
    else:
        assert with_grad == expected


def test_truncated_cuts_the_latent_gradient(ddim_setup):
    sampler, noise, cond, weights, param = ddim_setup
    gx, gc, gp = grads(sampler, G.Truncated(2), noise, cond, weights, param)
    assert gx.abs().max() == 0 and gc.abs().max() > 0 and gp.abs().max() > 0


def test_truncated_graph_steps_are_the_last_k():
    plan = G.Truncated(2).plan(5)
    assert plan.graph_steps == (3, 4) and plan.detach_before == 3
    assert G.Truncated(9).plan(5).detach_before is None
    assert G.Shortcut().plan(5).graph_steps == (0,)
    assert G.Shortcut(3).plan(5).graph_steps == (3,)
    with pytest.raises(ValueError, match="out of range"):
        G.Shortcut(5).plan(5)


# ---- the closed form of the shortcut ----------------------------------------------------------------

def step_coefficients(sched, kind):
    """(a_i, b_i) of x_{i+1} = a_i x_i + b_i eps_i for each step, from the schedulers' published formulas."""
    ts = sched.timesteps
    coeffs = []
    if kind in ("ddim", "ddpm", "ddim_v"):
        ac = sched.alphas_cumprod.double()
        ratio = sched.config.num_train_timesteps // sched.num_inference_steps
        for t in ts.tolist():
            a_t = ac[t]
            a_prev = ac[t - ratio] if t - ratio >= 0 else (torch.tensor(1.0, dtype=torch.float64)
                                                           if kind == "ddpm" else sched.final_alpha_cumprod.double())
            if kind == "ddim":  # Song et al. 2021, eq. 12 with eta = 0
                a = (a_prev / a_t).sqrt()
                b = (1 - a_prev).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
            elif kind == "ddim_v":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022), inserted in eq. 12
                a = a_prev.sqrt() * a_t.sqrt() + (1 - a_prev).sqrt() * (1 - a_t).sqrt()
                b = (1 - a_prev).sqrt() * a_t.sqrt() - a_prev.sqrt() * (1 - a_t).sqrt()
            else:  # Ho et al. 2020, eq. 7 posterior mean with x0 from eq. 15
                alpha_t = a_t / a_prev
                c0 = a_prev.sqrt() * (1 - alpha_t) / (1 - a_t)
                c1 = alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)
                a = c0 / a_t.sqrt() + c1
                b = -c0 * (1 - a_t).sqrt() / a_t.sqrt()
            coeffs.append((a.item(), b.item()))
    else:  # Euler (Karras et al. 2022, alg. 1 without churn) and flow-matching Euler: x += (s' - s) * d
        sig = sched.sigmas.double()
        coeffs = [(1.0, (sig[i + 1] - sig[i]).item()) for i in range(len(ts))]
    return coeffs


def eps_at(sampler, sched, kind, x, t, cond):
    """eps_theta as a function of the latent x at step t, with Euler's input scaling written out."""
    if kind == "euler":
        sigma = sched.sigmas[(sched.timesteps == t).nonzero().item()].double()
        x = x / (sigma ** 2 + 1).sqrt()
    return sampler.predict(x, t, cond)


SCHEDULERS = {
    "ddim": cosine_ddim,
    "ddim_v": lambda: ddim(prediction_type="v_prediction"),
    "ddpm": lambda: DDPMScheduler(num_train_timesteps=1000, clip_sample=False, beta_schedule="squaredcos_cap_v2"),
    "euler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear"),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_shortcut_latent_gradient_equals_closed_form(kind):
    sampler = make_sampler(SCHEDULERS[kind]())
    noise, cond, weights = inputs()
    x = noise.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    images = sampler(x, cond, gradient=G.Shortcut(), generator=gen)
    reward(images, weights).backward()

    sched = sampler.fresh_scheduler()
    states = []
    with torch.no_grad():
        final = sampler(noise, cond, callback=lambda s: states.append(s["x"]),
                        generator=torch.Generator().manual_seed(3))
    assert torch.allclose(final, images.detach(), rtol=0, atol=1e-12)  # same sample, only backward differs
    out = final.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(out, weights), out)
    coeffs = step_coefficients(sched, kind)
    tail = 1.0
    for a, _ in coeffs[1:]:
        tail *= a
    a0, b0 = coeffs[0]
    init_sigma = getattr(sched, "init_noise_sigma", 1.0)
    x0 = (noise * init_sigma).requires_grad_(True)
    eps = eps_at(sampler, sched, kind, x0, sched.timesteps[0], cond)
    (jvp,) = torch.autograd.grad(eps, x0, grad_outputs=tail * b0 * g)
    closed = (tail * a0 * g + jvp) * init_sigma
    assert_close_relative(x.grad, closed)
    assert states  # the callback saw every step
    assert len(states) == STEPS


@pytest.mark.parametrize("step", [0, 2, 3])
def test_shortcut_weight_and_embedding_gradient_equal_closed_form(step):
    sampler = make_sampler(cosine_ddim())
    noise, cond, weights = inputs()
    param = sampler.model.conv_in.weight
    _, gc, gp = grads(sampler, G.Shortcut(step), noise, cond, weights, param)

    sched = sampler.fresh_scheduler()
    states = [noise]
    with torch.no_grad():
        final = sampler(noise, cond, callback=lambda s: states.append(s["x"]))
    out = final.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(out, weights), out)
    coeffs = step_coefficients(sched, "ddim")
    tail = 1.0
    for a, _ in coeffs[step + 1:]:
        tail *= a
    c = cond.clone().requires_grad_(True)
    eps = sampler.predict(states[step], sched.timesteps[step], c)
    closed_c, closed_p = torch.autograd.grad(eps, (c, param), grad_outputs=tail * coeffs[step][1] * g)
    assert_close_relative(gc, closed_c)
    assert_close_relative(gp, closed_p)


def test_straight_through_latent_gradient_is_the_skip_path(ddim_setup):
    sampler, noise, cond, weights, param = ddim_setup
    gx, gc, _ = grads(sampler, G.StraightThrough(), noise, cond, weights, param)
    with torch.no_grad():
        final = sampler(noise, cond)
    out = final.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(out, weights), out)
    prod = 1.0
    for a, _ in step_coefficients(sampler.fresh_scheduler(), "ddim"):
        prod *= a
    assert_close_relative(gx, prod * g)
    assert gc.abs().max() == 0


# ---- multistep scheduler state ----------------------------------------------------------------------

def test_dpm_solver_truncation_is_real_and_full_matches_finite_differences():
    sampler = make_sampler(DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++",
                                                       solver_order=2))
    noise, cond, weights = inputs()
    param = sampler.model.conv_in.weight
    gx, _, _ = grads(sampler, G.Truncated(2), noise, cond, weights, param)
    assert gx.abs().max() == 0  # nothing leaks past the cut through the stored model outputs
    full = grads(sampler, G.Full(), noise, cond, weights, param)
    assert all(torch.equal(a, b) for a, b in zip(full, grads(sampler, G.Truncated(STEPS), noise, cond, weights, param)))
    d = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2), dtype=noise.dtype)

    def r(v):
        with torch.no_grad():
            return reward(sampler(v, cond), weights).item()

    # DPM-Solver rounds the sample to float32 inside each step, so the step h must dwarf float32 noise.
    assert central_difference(r, noise, d, h=1e-2) == pytest.approx((full[0] * d).sum().item(), rel=1e-4)
    sx, _, _ = grads(sampler, G.Shortcut(), noise, cond, weights, param)
    assert sx.abs().max() > 0


# ---- memory -----------------------------------------------------------------------------------------

def saved_bytes(sampler, policy, noise, cond):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sampler(noise.clone().requires_grad_(True), cond.clone().requires_grad_(True), gradient=policy)
    del out
    return total[0]


def test_shortcut_graph_holds_one_network_call_whatever_n():
    noise, cond, _ = inputs(dtype=torch.float32)
    by_n = {}
    for n in (10, 50):
        sampler = make_sampler(cosine_ddim(), steps=n, dtype=torch.float32)
        by_n[n] = {p: saved_bytes(sampler, policy, noise, cond)
                   for p, policy in (("shortcut", G.Shortcut()), ("full", G.Full()),
                                     ("checkpointed", G.Checkpointed()))}
    shortcut_10, shortcut_50 = by_n[10]["shortcut"], by_n[50]["shortcut"]
    one_call = by_n[10]["full"] / 10
    assert abs(shortcut_50 - shortcut_10) < 0.02 * one_call
    assert shortcut_10 < 1.5 * one_call
    assert by_n[50]["full"] > 4.5 * by_n[10]["full"]
    assert by_n[50]["checkpointed"] < 0.2 * by_n[50]["full"]


# ---- determinism and bad input ----------------------------------------------------------------------

def test_same_seed_same_samples_and_gradients_bit_for_bit():
    sampler = make_sampler(ddim(), eta=0.7)
    noise, cond, weights = inputs()
    param = sampler.model.conv_in.weight
    runs = [grads(sampler, G.Shortcut("random"), noise, cond, weights, param) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    samples = [sampler(noise, cond, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(*samples)
    other = sampler(noise, cond, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(samples[0], other)  # eta > 0 really draws noise


def test_bad_input_raises_value_error_naming_the_argument(cond_unet):
    sampler = ds.Sampler(cond_unet, cosine_ddim(), 5)
    noise = torch.randn(2, 1, 8, 8)
    cond = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="latents"):
        sampler(torch.randn(2, 3, 8, 8), cond)
    with pytest.raises(ValueError, match="latents"):
        sampler(torch.randn(2, 1, 7, 8), cond)
    with pytest.raises(ValueError, match="cond"):
        sampler(noise, torch.randn(3, 3, 8))
    with pytest.raises(ValueError, match="num_inference_steps"):
        ds.Sampler(cond_unet, cosine_ddim(), 0)
    with pytest.raises(ValueError, match="start_step"):
        sampler(noise, cond, start_step=5)
    with pytest.raises(ValueError, match="gradient"):
        sampler(noise, cond, gradient="backprop-everything")
    with pytest.raises(ValueError, match="uncond"):
        ds.Sampler(cond_unet, cosine_ddim(), 5, guidance_scale=3.0)


def test_clip_sample_warns_once_under_a_gradient_policy(cond_unet):
    sampler = ds.Sampler(cond_unet, ddim(clip_sample=True), 3)
    noise, cond = torch.randn(1, 1, 8, 8), torch.randn(1, 3, 8)
    with pytest.warns(UserWarning, match="clip_sample"):
        sampler(noise.requires_grad_(True), cond, gradient="shortcut")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler(noise, cond, gradient="shortcut")
        sampler(noise, cond)
