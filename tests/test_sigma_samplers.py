"""σ schedules (Karras, exponential, beta) and the samplers added with them (Heun, LMS, DPM++ 2M SDE), against
diffusers' schedulers: their σ's and timesteps, whole runs on an analytic toy model, and Stable Diffusion end to end."""

import inspect

import pytest
import torch

from ldm import load_pipeline
from ldm.samplers import (ALIASES, SAMPLERS, dpm_solver_timesteps, dpmpp_2m, euler, euler_timesteps, get_sampler, heun, lms, resolve_sampler,
                          sample, sampler_timesteps, sigma_steps)
from ldm.samplers.dpm_solver import dpm_solver_sigma_steps
from ldm.samplers.lms import lms_coefficients
from ldm.samplers.sigmas import beta_sigmas, exponential_sigmas, karras_sigmas, sigma_to_t
from test_samplers import SD15, linear_model, quiet_numpy, rel_err, sd_schedule, x_T_sd

SCHEDULES = ["karras", "exponential", "beta"]
FLAG = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
# the diffusers class behind each sampler, and its extra settings
SCHEDULER = {"euler": ("EulerDiscreteScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
             "lms": ("LMSDiscreteScheduler", {}), "dpm++2m": ("DPMSolverMultistepScheduler", {}),
             "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
             "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3})}


def scheduler(name, spacing="leading", sigmas=None, prediction="eps", alpha_bar=None):
    """diffusers' scheduler for ``name`` with SD 1.5's settings; ``alpha_bar`` replaces its float32 ᾱ (see
    test_sigma_schedules_match_diffusers)."""
    diffusers = pytest.importorskip("diffusers")
    cls, extra = SCHEDULER[name]
    flags = {FLAG[sigmas]: True} if sigmas else {}
    sched = getattr(diffusers, cls)(**SD15, timestep_spacing=spacing, prediction_type=PREDICTION[prediction],
                                    **extra, **flags)
    if alpha_bar is not None:
        sched.alphas_cumprod = alpha_bar
    return sched


def diffusers_loop(sched, x_T, steps, generator=None):
    """A diffusers pipeline's loop, by hand. x_T is in model space: the σ-space schedulers get x_T · √(1 + σ_max²)
    (test_samplers.test_diffusers_euler_init_noise_sigma_quirk), DPM-Solver x_T itself. Both end at σ = 0."""
    sched.set_timesteps(steps)
    latents = x_T if type(sched).__name__.startswith("DPM") else x_T * (sched.sigmas.max() ** 2 + 1) ** 0.5
    noisy = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        latents = sched.step(linear_model(sched.scale_model_input(latents, t), t), t, latents, **noisy).prev_sample
    return latents


# --- the schedules --------------------------------------------------------------------------------------------------

def test_schedule_formulas():
    """Eq. 5's end points and ρ; exponential is geometric; beta's Beta(0.6, 0.6) quantiles against scipy's."""
    k = karras_sigmas(14.6, 0.03, 10)
    assert k[0].item() == pytest.approx(14.6, rel=1e-12) and k[-1].item() == pytest.approx(0.03, rel=1e-12)
    assert torch.allclose(k ** (1 / 7), torch.linspace(14.6 ** (1 / 7), 0.03 ** (1 / 7), 10, dtype=torch.float64))
    e = exponential_sigmas(14.6, 0.03, 10)
    assert torch.allclose(e[1:] / e[:-1], (e[1] / e[0]).expand(9))
    stats = pytest.importorskip("scipy.stats")
    b = beta_sigmas(14.6, 0.03, 12)
    ppf = torch.tensor(stats.beta.ppf(1 - torch.linspace(0, 1, 12, dtype=torch.float64).numpy(), 0.6, 0.6))
    assert torch.allclose(b, 0.03 + ppf * (14.6 - 0.03), rtol=1e-12, atol=1e-12)


def test_sigma_to_t_inverts_sigma_at_training_steps():
    s = sd_schedule()
    ab = s.alpha_bar_f64
    t = torch.tensor([999.0, 500.0, 1.0, 0.0])
    assert torch.allclose(sigma_to_t(s, ((1 - ab[t.long()]) / ab[t.long()]).sqrt()), t.double(), atol=1e-9)
    assert sigma_to_t(s, torch.tensor([1e3, 1e-4])).tolist() == [999.0, 0.0]  # clamped to [0, T − 1]


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("sigmas", SCHEDULES)
@pytest.mark.parametrize("name,spacing,steps", [("euler", "leading", 10), ("euler", "linspace", 25),
                                                ("heun", "trailing", 10), ("lms", "leading", 7),
                                                ("dpm++2m", "leading", 10), ("dpm++2m", "linspace", 25)])
def test_sigma_schedules_match_diffusers(name, spacing, steps, sigmas):
    """σ's and timesteps as diffusers' ``use_*_sigmas`` make them: ldm's (float64 ᾱ) against diffusers' given the same
    ᾱ (rel 1e-6: its results are cast to float32), and against diffusers' own float32 ᾱ (rel 1e-4 — 1 − ᾱ_1 ≈ 1.7e-3
    carries float32's 6e-8 as 3.5e-5 relative into σ_min)."""
    s = sd_schedule()
    if name.startswith("dpm"):
        ours_t, ours_sigma = dpm_solver_sigma_steps(s, steps, sigmas)
    else:
        ours_t, ours_sigma = sigma_steps(s, steps, spacing, 1, sigmas=sigmas)
        ours_sigma = ours_sigma[:-1]
    assert torch.equal(sampler_timesteps(name, s, steps, spacing, 1, sigmas=sigmas), ours_t)
    for alpha_bar, tol in ((s.alpha_bar_f64, 1e-6), (None, 1e-4)):
        sched = scheduler(name, spacing, sigmas, alpha_bar=alpha_bar)
        sched.set_timesteps(steps)
        ref_sigma, ref_t = sched.sigmas[:-1].double(), sched.timesteps.double()
        if name == "heun":  # diffusers repeats every σ and t but the first, for the correction steps
            ref_sigma, ref_t = ref_sigma[::2], torch.cat([ref_t[:1], ref_t[1::2]])
        assert ((ours_sigma - ref_sigma).abs() / ref_sigma).max() < tol
        if name.startswith("dpm"):
            assert torch.equal(ours_t, ref_t.long()) or tol > 1e-6  # float32 ᾱ may tip a rounding
        else:
            assert torch.allclose(ours_t, ref_t, rtol=tol, atol=tol * 1000)


def test_sigmas_none_is_the_old_path_bit_for_bit():
    """No schedule: the plans are exactly the timestep paths the σ-space samplers always took (the timesteps given
    explicitly, σ interpolated at them)."""
    s, x_T = sd_schedule(), x_T_sd()
    for spacing in ("leading", "linspace", "trailing"):
        plans = {euler_timesteps(s, 7, spacing, 1): (euler, heun, lms), dpm_solver_timesteps(s, 7, spacing, 1): (dpmpp_2m,)}
        for ts, loops in plans.items():
            for loop in loops:
                a = list(loop(linear_model, s, x_T, num_inference_steps=7, spacing=spacing, steps_offset=1))[-1].x_prev
                b = list(loop(linear_model, s, x_T, timesteps=ts, sigmas=None))[-1].x_prev
                assert torch.equal(a, b), (loop, spacing)
        assert torch.equal(sigma_steps(s, 7, spacing, 1)[0], euler_timesteps(s, 7, spacing, 1))
    with pytest.raises(ValueError, match="not both"):
        next(euler(linear_model, s, x_T, timesteps=euler_timesteps(s, 7), sigmas="karras"))


# --- the samplers on a toy model ------------------------------------------------------------------------------------

def ours(name, spacing, steps, prediction="eps", sigmas=None, generator=None, x_T=None):
    s = sd_schedule()
    return sample(linear_model, s, x_T_sd().shape, x_T=x_T_sd() if x_T is None else x_T, sampler=name,
                  num_inference_steps=steps, spacing=spacing, steps_offset=1, prediction=prediction, sigmas=sigmas,
                  generator=generator, progress=False)


TOY_CASES = [(name, spacing, steps, prediction, sigmas)
             for name in ("heun", "lms", "dpm++2m_sde")
             for spacing, steps, prediction in (("leading", 10, "eps"), ("linspace", 25, "eps"), ("trailing", 8, "v"))
             for sigmas in (None, "karras")] + \
            [(name, "leading", 12, "eps", sigmas) for name in ("euler", "dpm++2m", "heun", "lms", "dpm++2m_sde")
             for sigmas in SCHEDULES] + \
            [("dpm++3m", spacing, steps, prediction, sigmas)  # S ≥ 15: no order-2 step before the last
             for spacing, steps, prediction in (("leading", 10, "eps"), ("linspace", 25, "eps"), ("trailing", 8, "v"),
                                                ("leading", 16, "eps"), ("leading", 3, "eps"))
             for sigmas in (None, "karras")]


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("name,spacing,steps,prediction,sigmas", TOY_CASES)
def test_toy_runs_match_diffusers(name, spacing, steps, prediction, sigmas):
    """Whole runs against diffusers' scheduler loop; the SDE sampler with the same noise, so the generators end in the
    same state. Against diffusers given ldm's ᾱ to 1e-5 (measured ≤ 4e-7), against its own float32 ᾱ to 1e-4: there
    t(σ_max) comes out 998.99998 and "exponential"/"beta" DPM-Solver truncates it to 998 (measured ≤ 4.5e-5)."""
    for alpha_bar, tol in ((sd_schedule().alpha_bar_f64, 1e-5), (None, 1e-4)):
        g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        ref = diffusers_loop(scheduler(name, spacing, sigmas, prediction, alpha_bar), x_T_sd(), steps, g_ref)
        got = ours(name, spacing, steps, prediction, sigmas, g_ours)
        assert rel_err(got, ref) < tol
        assert torch.equal(g_ours.get_state(), g_ref.get_state())


@pytest.mark.parametrize("sigmas", [None, *SCHEDULES])
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms", "dpm++2m", "dpm++2m_sde", "dpm++3m", "dpm++sde"])
def test_every_sigma_sampler_lands_on_a_point_mass(name, sigmas):
    """With the perfect x̂_0 for data x0 = target the ODE's solution is a straight line in σ, which every method
    follows exactly, and the stochastic ones end on it too: each run, on each schedule, ends on target."""
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(lambda x, t, c: target.expand_as(x), sd_schedule(), x_T.shape, x_T=x_T, sampler=name, sigmas=sigmas,
                 num_inference_steps=6, prediction="x0", generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.allclose(out, target.expand_as(out), atol=1e-5)


def test_heun_and_lms_orders_show():
    """Heun and LMS are not Euler: same plan, different answers; Heun's last step is an Euler step (2S − 1 calls)."""
    s, x_T = sd_schedule(), x_T_sd()
    calls = []

    def counting(x, t, c):
        calls.append(t)
        return linear_model(x, t)

    list(heun(counting, s, x_T, num_inference_steps=6))
    assert len(calls) == 11
    final = {n: ours(n, "leading", 6) for n in ("euler", "heun", "lms")}
    assert rel_err(final["heun"], final["euler"]) > 1e-3 and rel_err(final["lms"], final["euler"]) > 1e-3
    # order 1 is Euler: LMS's first coefficient on its own is the step σ' − σ
    sig = torch.tensor([3.0, 2.0, 1.5, 0.0], dtype=torch.float64)
    assert lms_coefficients(sig, 0, 1) == [-1.0]
    assert sum(lms_coefficients(sig, 2, 3)) == pytest.approx(-1.5)  # the weights of a constant slope add to the step
    a = list(lms(linear_model, s, x_T, num_inference_steps=6, steps_offset=1, order=1))[-1].x_prev
    assert rel_err(a, final["euler"]) < 1e-6


def test_dpmpp_3m_is_third_order_after_warm_up():
    """3M is 2M on its first two steps and its last (and, for S < 15, the one before it): up to S = 4 the runs are
    the same, from S = 5 they part at the third step; and it refuses the SDE (diffusers' 3M SDE is not done here)."""
    s, x_T = sd_schedule(), x_T_sd()
    for steps in (3, 4, 6, 20):
        three = list(SAMPLERS["dpm++3m"](linear_model, s, x_T, num_inference_steps=steps))
        two = list(dpmpp_2m(linear_model, s, x_T, num_inference_steps=steps))
        assert torch.equal(three[1].x_prev, two[1].x_prev)
        assert torch.equal(three[-1].x_prev, two[-1].x_prev) == (steps <= 4), steps
        if steps > 4:
            assert rel_err(three[2].x_prev, two[2].x_prev) > 1e-5
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        next(dpmpp_2m(linear_model, sd_schedule(), x_T_sd(), order=3, sde=True))


# --- DPM++ SDE: no diffusers parity (its noise is a torchsde Brownian tree), so k-diffusion's loop and statistics ----

MU, S = 0.5, 0.3  # Gaussian data x_0 ~ N(μ, s²) per pixel: x̂_0 = E[x_0 | x_σ] is known exactly


def gaussian_x0(x_sigma, sigma):
    """The exact denoiser for N(μ, s²) data in σ-space: E[x_0 | x_0 + σ ε = x_σ] = (s² x_σ + σ² μ)/(s² + σ²)."""
    return (S**2 * x_sigma + sigma**2 * MU) / (S**2 + sigma**2)


def gaussian_model(schedule):
    """The same denoiser as an ldm model (x_t, t) → x̂_0: σ read back from t by inverting ``sigma_to_t`` (log-linear
    between training steps), so the model knows the exact σ the sampler meant."""
    ab = schedule.alpha_bar_f64
    log_sigmas = ((1 - ab) / ab).sqrt().log()

    def model(x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0]
        low = int(t.floor().clamp(max=len(log_sigmas) - 2))
        sigma = (log_sigmas[low] + (t - low) * (log_sigmas[low + 1] - log_sigmas[low])).exp()
        return gaussian_x0(x * (1 + sigma**2).sqrt().float(), sigma).float()
    return model


def k_diffusion_dpmpp_sde(denoiser, x, sigmas, noise_sampler):
    """k-diffusion's ``sample_dpmpp_sde`` (η = 1, s_noise = 1, r = ½), written out: x in σ-space, ``denoiser(x, σ)``."""
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())

    def ancestral(sigma_from, sigma_to):
        up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        return (sigma_to**2 - up**2) ** 0.5, up

    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * 0.5
        sd, su = ancestral(sigma_fn(t), sigma_fn(s))
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * su
        denoised_2 = denoiser(x_2, sigma_fn(s))
        sd, su = ancestral(sigma_fn(t), sigma_fn(t_next))
        t_next_ = t_fn(sd)
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_2  # (1 − 1/2r) D + D₂/2r, r = ½
        x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * su
    return x


def test_dpmpp_sde_is_k_diffusions_loop_given_the_same_brownian_increments():
    """ldm's loop against k-diffusion's, the latter fed a noise sampler that makes the same Brownian increments from the
    same generator: W on [σ_m, σ] first, then W on [σ', σ] as its extension (√a z₁ + √(1 − a) z₂)."""
    s = sd_schedule()
    x_T = x_T_sd()
    for sigmas in (None, "karras"):
        got = sample(gaussian_model(s), s, x_T.shape, x_T=x_T, sampler="dpm++sde", sigmas=sigmas, prediction="x0",
                     num_inference_steps=9, spacing="leading", steps_offset=1,
                     generator=torch.Generator().manual_seed(3), progress=False)
        _, plan = sigma_steps(s, 9, "leading", 1, sigmas=sigmas)
        g, half = torch.Generator().manual_seed(3), []

        def noise_sampler(sigma_from, sigma_to):
            if not half:  # the half-step: (W(σ_m) − W(σ))/√(σ − σ_m) = z₁
                half.append((torch.randn(x_T.shape, generator=g), sigma_from - sigma_to))
                return half[0][0]
            z1, short = half.pop()
            a = short / (sigma_from - sigma_to)  # the whole step's increment contains the half-step's
            return a**0.5 * z1 + (1 - a) ** 0.5 * torch.randn(x_T.shape, generator=g)

        x_sigma = x_T.double() * (1 + plan[0] ** 2).sqrt()
        x = k_diffusion_dpmpp_sde(lambda x, sigma: gaussian_x0(x, sigma).float(), x_sigma, plan, noise_sampler)
        assert rel_err(got, x.float()) < 1e-5


def test_dpmpp_sde_samples_the_data_distribution():
    """Started from the exact marginal at σ_max, the chain ends distributed as the data, N(μ, s²): mean and standard
    deviation over 8192 pixels within 4 standard errors. And it is a sampler of that law, not the ODE's transport of
    x_T: its samples differ from DPM++ 2M's from the same x_T, and two seeds give uncorrelated samples. (Measured: mean
    0.503, s.d. 0.299 at 25 steps, 0.295 at 12; Euler a, first order, misses this test with s.d. 0.267 at 25.)"""
    s = sd_schedule()
    _, plan = sigma_steps(s, 25, "leading", 1, sigmas="karras")
    g = torch.Generator().manual_seed(0)
    x_T = (MU + (S**2 + plan[0] ** 2).sqrt() * torch.randn(2048, 1, 2, 2, generator=g, dtype=torch.float64))
    x_T = (x_T / (1 + plan[0] ** 2).sqrt()).float()
    run = lambda name, seed: sample(gaussian_model(s), s, x_T.shape, x_T=x_T, sampler=name, sigmas="karras",
                                    prediction="x0", num_inference_steps=25, spacing="leading", steps_offset=1,
                                    generator=torch.Generator().manual_seed(seed), progress=False)
    out = run("dpm++sde", 1)
    assert abs(out.mean().item() - MU) < 4 * S / 8192**0.5 and abs(out.std().item() - S) < 4 * S / (2 * 8192) ** 0.5
    other, ode = run("dpm++sde", 2), run("dpm++2m", 1)
    assert abs(torch.corrcoef(torch.stack([out.flatten(), other.flatten()]))[0, 1].item()) < 0.1
    assert (out - ode).abs().mean() > 0.1


def test_dpmpp_sde_calls_the_model_twice_a_step_and_draws_two_noises():
    s, x_T, calls = sd_schedule(), x_T_sd(), []

    def counting(x, t, c):
        calls.append(t)
        return linear_model(x, t)

    g = torch.Generator().manual_seed(5)
    list(SAMPLERS["dpm++sde"](counting, s, x_T, num_inference_steps=6, sigmas="karras", generator=g))
    assert len(calls) == 11  # 2S − 1: the last step, to σ = 0, is one Euler call
    h = torch.Generator().manual_seed(5)
    for _ in range(2 * 5):
        torch.randn(x_T.shape, generator=h)
    assert torch.equal(g.get_state(), h.get_state())
    a, b = (ours("dpm++sde", "leading", 6, generator=torch.Generator().manual_seed(k)) for k in (1, 1))
    c = ours("dpm++sde", "leading", 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and rel_err(c, a) > 1e-2


def test_dpmpp_2m_sde_is_noisy_and_seeded():
    a, b = (ours("dpm++2m_sde", "leading", 8, generator=torch.Generator().manual_seed(k)) for k in (1, 1))
    c = ours("dpm++2m_sde", "leading", 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and rel_err(c, a) > 1e-2
    assert rel_err(ours("dpm++2m", "leading", 8), a) > 1e-2


# --- names ----------------------------------------------------------------------------------------------------------

def test_ui_names_resolve_and_unknown_ones_list_the_known():
    assert resolve_sampler("DPM++ 2M Karras") == ("dpm++2m", "karras")
    assert resolve_sampler("dpm++ 2m sde karras") == ("dpm++2m_sde", "karras")
    assert resolve_sampler("DPM++ 3M Karras") == ("dpm++3m", "karras") and resolve_sampler("DPM++ 3M")[1] is None
    assert resolve_sampler("DPM++ SDE Karras") == ("dpm++sde", "karras") and resolve_sampler("DPM++ SDE")[1] is None
    assert resolve_sampler("Euler a") == ("euler_a", None) and resolve_sampler("heun", "beta") == ("heun", "beta")
    assert all(resolve_sampler(alias)[0] in SAMPLERS for alias in ALIASES)
    with pytest.raises(ValueError, match=r"unknown sampler 'PLMS'; known: ddpm, ddim, .*heun, lms, lcm; or as UIs "
                                         r"name them: Euler, Euler a, DPM\+\+ 2M, DPM\+\+ 2M Karras, .*DDIM, LCM"):
        get_sampler("PLMS")
    with pytest.raises(ValueError, match="means sigmas='karras'"):
        resolve_sampler("LMS Karras", "beta")
    with pytest.raises(ValueError, match="takes no sigma schedule"):
        resolve_sampler("ddim", "karras")
    with pytest.raises(ValueError, match="unknown sigma schedule 'polyexponential'"):
        resolve_sampler("euler", "polyexponential")
    s = sd_schedule()
    assert torch.equal(sampler_timesteps("LMS Karras", s, 6, "leading", 1), sampler_timesteps("lms", s, 6, "leading", 1,
                                                                                               sigmas="karras"))
    x_T = x_T_sd()
    assert torch.equal(sample(linear_model, s, x_T.shape, x_T=x_T, sampler="DPM++ 2M Karras", num_inference_steps=6,
                              progress=False),
                       list(dpmpp_2m(linear_model, s, x_T, num_inference_steps=6, sigmas="karras"))[-1].x_prev)


def test_pipelines_take_ui_names_and_sigmas():
    """``pipe(sampler="DPM++ 2M Karras")`` is ``pipe(sampler="dpm++2m", sigmas="karras")``; a σ schedule changes the
    images; img2img on a σ schedule is refused (diffusers noises x_0 to σ there, not yet done here)."""
    from ldm.pipeline import DiffusionPipeline
    from ldm.sampling import SamplingConfig
    from ldm.unet import UNet
    from test_pipeline import UNET

    torch.manual_seed(0)
    pipe = DiffusionPipeline(UNet(UNET).eval(), SamplingConfig(clip_x0=False))
    run = lambda **kw: pipe(2, num_inference_steps=5, class_label=1, progress=False, output="tensor", **kw)
    karras = run(sampler="DPM++ 2M Karras")
    assert torch.equal(karras, run(sampler="dpm++2m", sigmas="karras"))
    assert (karras - run(sampler="dpm++2m")).abs().max() > 1e-3
    assert torch.equal(run(sampler="LMS Karras"), run(sampler="lms", sigmas="karras"))
    assert torch.equal(run(sampler="DPM++ SDE Karras"), run(sampler="dpm++sde", sigmas="karras"))
    assert torch.equal(run(sampler="DPM++ 3M"), run(sampler="dpm++3m"))
    assert pipe.timesteps("Heun", 5).tolist() == pipe.timesteps("heun", 5).tolist()
    half = run(sampler="euler", sigmas="beta", image=karras, strength=0.5)  # img2img on a σ schedule runs
    assert half.shape == karras.shape and torch.isfinite(half).all()


def test_cli_takes_ui_names_and_sigmas():
    from ldm.cli import build_parser

    args = build_parser().parse_args(["txt2img", "model", "--prompt", "x", "--sampler", "DPM++ 2M SDE Karras"])
    assert args.sampler == "DPM++ 2M SDE Karras" and args.sigmas is None
    args = build_parser().parse_args(["sample", "run", "--sampler", "heun", "--sigmas", "beta"])
    assert (args.sampler, args.sigmas) == ("heun", "beta")
    for bad in (["--sampler", "PLMS"], ["--sigmas", "polyexponential"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["sample", "run", *bad])


# --- Stable Diffusion end to end ------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
from test_stable_diffusion import TOL, assert_parity, our_images, ref_images, reference  # noqa: E402,F401

E2E = [("Heun", "heun", None), ("LMS", "lms", None), ("DPM++ 2M SDE", "dpm++2m_sde", None),
       ("LMS Karras", "lms", "karras"), ("DPM++ 2M Karras", "dpm++2m", "karras"),
       ("DPM++ 2M SDE Karras", "dpm++2m_sde", "karras"), ("euler", "euler", "karras"), ("euler", "euler", "exponential"),
       ("euler", "euler", "beta"), ("dpm++2m", "dpm++2m", "beta"), ("DPM++ 3M", "dpm++3m", None),
       ("DPM++ 3M Karras", "dpm++3m", "karras")]


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("sampler,name,sigmas", E2E)
def test_stable_diffusion_matches_diffusers(reference, sampler, name, sigmas):
    """Images to diffusers' with the same scheduler settings (max |Δ| < TOL), and each change moves them 20 × that.

    DPM-Solver on "exponential"/"beta" σ's truncates t(σ) to an integer; from its float32 ᾱ diffusers gets
    t(σ_max) = 998.99998 and asks the model at 998, not 999, which this fixture's timestep embedding hears (0.46):
    those runs compare with diffusers given ldm's ᾱ (as test_toy_runs_match_diffusers does too)."""
    ref, folder = reference
    cls, extra = SCHEDULER[name]
    swapped = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra, **({FLAG[sigmas]: True} if sigmas else {}))
    if name.startswith("dpm") and sigmas in ("exponential", "beta"):
        swapped.alphas_cumprod = sd_schedule().alpha_bar_f64
    ref = diffusers.StableDiffusionPipeline(**(ref.components | {"scheduler": swapped}))
    ref.set_progress_bar_config(disable=True)
    pipe = load_pipeline(folder)
    steps = 8 if name == "dpm++3m" else 5  # 3M's warm-up and finish leave one third-order step of 5, four of 8
    expected = ref_images(ref, "a red cube on a table", steps, negative_prompt="blurry")
    implied = resolve_sampler(sampler)[1]
    options = dict(sampler=sampler, negative_prompt="blurry", steps=steps) | ({} if implied else {"sigmas": sigmas})
    run = lambda **changes: our_images(pipe, **({"prompt": "a red cube on a table"} | options | changes))
    assert_parity(run, expected, TOL, prompt="a red cube on a chair", guidance=1.0)


IMG2IMG = [("euler", "EulerDiscreteScheduler", {}), ("dpm++2m", "DPMSolverMultistepScheduler", {}),
           ("dpm++3m", "DPMSolverMultistepScheduler", {"solver_order": 3}), ("heun", "HeunDiscreteScheduler", {})]
# Not LMS: diffusers' LMSDiscreteScheduler picks its order from the absolute step index, so an img2img run that begins
# at step k ≥ 1 has one slope but weights it with the first coefficient of an order-min(k + 1, 4) formula (σ's from
# before the start); ldm's LMS starts the run at order 1, as its derivative history does.


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("sampler,cls,extra", IMG2IMG)
def test_img2img_on_a_sigma_schedule_matches_diffusers(reference, sampler, cls, extra):
    """Image-to-image with Karras σ's against StableDiffusionImg2ImgPipeline given ``use_karras_sigmas=True``: strength
    slices the S-step σ plan (``set_begin_index``) and x_0 is noised to the σ the run starts at."""
    from PIL import Image
    import numpy as np

    ref, folder = reference
    swapped = getattr(diffusers, cls).from_config(ref.scheduler.config, use_karras_sigmas=True, **extra)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**(ref.components | {"scheduler": swapped}))
    img2img.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    expected = torch.from_numpy(img2img("a house", image=image, strength=0.8, num_inference_steps=8, output_type="np",
                                        generator=torch.Generator().manual_seed(0)).images).permute(0, 3, 1, 2) * 2 - 1
    pipe = load_pipeline(folder)
    run = lambda **changes: our_images(pipe, **(dict(prompt="a house", image=image, strength=0.8, steps=8,
                                                     sampler=sampler, sigmas="karras") | changes))
    assert_parity(run, expected, TOL, prompt="a boat", guidance=1.0, strength=0.3)
