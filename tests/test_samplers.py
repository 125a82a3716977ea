import pytest
import torch

from ldm.diffusion import q_sample
from ldm.samplers import (SAMPLERS, classifier_free_guidance, ddim, ddpm, dpm_solver_timesteps, dpmpp_2m, euler, euler_ancestral,
                          euler_timesteps, get_sampler, sample, sampler_timesteps)
from ldm.samplers.euler import sigmas_at
from ldm.schedule import NoiseSchedule, ScheduleConfig, gather


def toy_model(x, t, cond):
    """A smooth, t-dependent stand-in for a denoiser (bounded ε predictions)."""
    return torch.tanh(0.5 * x) * (1 + t.float()[:, None, None, None] / 1000)


def test_ddim_eta1_over_all_steps_equals_ddpm():
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=200))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = list(ddim(toy_model, s, x_T, num_inference_steps=200, eta=1.0, generator=torch.Generator().manual_seed(5)))
    b = list(ddpm(toy_model, s, x_T, clip_x0=False, generator=torch.Generator().manual_seed(5)))
    assert len(a) == len(b) == 200
    for ra, rb in zip(a[::20], b[::20]):
        assert ra.t == rb.t
        assert torch.allclose(ra.x_prev, rb.x_prev, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a[-1].x_prev, b[-1].x_prev, rtol=1e-3, atol=1e-3)


def test_ddim_eta0_is_deterministic_and_inverts_a_perfect_model():
    """With the true ε of a single data point, DDIM(η=0) lands on that point from any x_T."""
    s = NoiseSchedule()
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)

    def oracle(x, t, c):  # ε implied by x_t if x_0 were `target`
        ab = gather(s.alpha_bar, t, x)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sample(oracle, s, x_T.shape, x_T=x_T, sampler="ddim", num_inference_steps=10, progress=False)
    assert torch.allclose(out, target.expand_as(out), atol=1e-4)
    again = sample(oracle, s, x_T.shape, x_T=x_T, sampler="ddim", num_inference_steps=10, progress=False)
    assert torch.equal(out, again)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_samplers_handle_each_parametrisation(prediction):
    s = NoiseSchedule(ScheduleConfig.cosine())
    target = torch.full((1, 1, 2, 2), 0.25)

    def oracle(x, t, c):
        ab = gather(s.alpha_bar, t, x)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return target.expand_as(x) if prediction == "x0" else ab.sqrt() * eps - (1 - ab).sqrt() * target

    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "ddpm"):
        out = sample(oracle, s, x_T.shape, x_T=x_T, sampler=name, num_inference_steps=20, prediction=prediction,
                     generator=torch.Generator().manual_seed(0), progress=False)
        assert torch.allclose(out, target.expand_as(out), atol=1e-3), name


def test_same_seed_same_samples_different_seed_different():
    s = NoiseSchedule()
    run = lambda seed, name: sample(toy_model, s, (2, 1, 4, 4), sampler=name, num_inference_steps=20, eta=0.5,
                                    generator=torch.Generator().manual_seed(seed), progress=False) if name == "ddim" else \
        sample(toy_model, s, (2, 1, 4, 4), sampler=name, num_inference_steps=20,
               generator=torch.Generator().manual_seed(seed), progress=False)
    for name in ("ddim", "ddpm"):
        assert torch.equal(run(0, name), run(0, name))
        assert not torch.allclose(run(0, name), run(1, name))


def test_generator_yields_records_for_every_step():
    s = NoiseSchedule()
    x_T = torch.randn(1, 1, 4, 4)
    records = list(ddim(toy_model, s, x_T, num_inference_steps=7))
    assert [r.index for r in records] == list(range(7))
    assert [r.t for r in records] == s.timesteps(7).tolist()
    assert torch.equal(records[0].x_t, x_T)
    for prev, nxt in zip(records, records[1:]):
        assert torch.equal(prev.x_prev, nxt.x_t)
    assert torch.equal(records[-1].x_prev, records[-1].x0_pred)  # ᾱ = 1 after the last step


def test_ddpm_variances_differ_and_clip_bounds_x0():
    s = NoiseSchedule()
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    small = list(ddpm(toy_model, s, x_T, num_inference_steps=50, variance="fixed_small", generator=torch.Generator().manual_seed(0)))
    large = list(ddpm(toy_model, s, x_T, num_inference_steps=50, variance="fixed_large", generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(small[-1].x_prev, large[-1].x_prev)
    assert all(r.x0_pred.abs().max() <= 1 for r in small)


def test_classifier_free_guidance_arithmetic():
    def model(x, t, cond):
        return x * cond.float()[:, None, None, None]

    x, t = torch.ones(2, 1, 2, 2), torch.tensor([5, 5])
    cond, null = torch.tensor([3, 3]), torch.tensor([10])
    assert torch.equal(classifier_free_guidance(model, 1.0, null)(x, t, cond), model(x, t, cond))
    guided = classifier_free_guidance(model, 2.5, null)(x, t, cond)
    assert torch.allclose(guided, torch.full_like(x, 10 + 2.5 * (3 - 10)))
    with pytest.raises(ValueError, match="condition"):
        classifier_free_guidance(model, 2.0, null)(x, t, None)


def test_bad_options_are_named():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match=r"unknown sampler 'euler_x'; known: .*dpm\+\+2m, euler, euler_a"):
        get_sampler("euler_x")
    with pytest.raises(ValueError, match="timesteps must lie in"):
        list(euler(toy_model, s, torch.zeros(1, 1, 2, 2), timesteps=torch.tensor([1000.0, 10.0])))
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(toy_model, s, (1, 1, 2, 2), sampler="ddim", num_inference_steps=2000, progress=False)
    with pytest.raises(ValueError, match="variance"):
        list(ddpm(toy_model, s, torch.zeros(1, 1, 2, 2), variance="learned"))
    with pytest.raises(ValueError, match="prediction"):
        sample(toy_model, s, (1, 1, 2, 2), num_inference_steps=3, prediction="score", progress=False)


# --- few-step samplers for Stable Diffusion: DPM-Solver++(2M), Euler, Euler ancestral ---------------------------------

SD15 = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
MIX = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.2


# diffusers' schedulers call np.array(tensor, …), which numpy 2 flags inside torch; not ours to fix.
quiet_numpy = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def linear_model(x, t, cond=None):
    """An analytic stand-in for an SD UNet: a fixed channel-mixing map of x_t plus a t-dependent shift.

    t may be (B,) int64 (ldm), a float tensor (fractional "linspace" timesteps) or diffusers' 0-dim timestep.
    """
    shift = 0.05 * torch.sin(torch.as_tensor(t).float().reshape(-1, 1, 1, 1) / 100)
    return 0.3 * x + torch.einsum("oc,bchw->bohw", MIX, x) + shift


def sd_schedule():
    return NoiseSchedule(ScheduleConfig.stable_diffusion())


def x_T_sd(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def diffusers_loop(sched, x_T, steps, start=0, x0=None, noise=None, generator=None):
    """What a diffusers pipeline does, by hand: txt2img from x_T, or img2img from x0 at the ``start``-th timestep.

    Returns (final latents, the timesteps run). x_T is in model space; the Euler schedulers work on x_σ, so they get
    x_T · √(1 + σ_max²) (test_diffusers_euler_init_noise_sigma_quirk: not ``init_noise_sigma`` under "trailing"/"linspace").
    Both end at σ = 0, where x_σ = x_t: the final latents compare with ldm's as they are.
    """
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[start:]
    if x0 is not None:
        sched.set_begin_index(start)
        latents = sched.add_noise(x0, noise, timesteps[:1])
    elif type(sched).__name__.startswith("Euler"):
        latents = x_T * (sched.sigmas.max() ** 2 + 1) ** 0.5
    else:
        assert sched.init_noise_sigma == 1.0  # DPM-Solver works in model space
        latents = x_T
    for t in timesteps:
        eps = linear_model(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, generator=generator).prev_sample
    return latents, timesteps


CASES = [(5, "leading", "eps"), (10, "leading", "eps"), (25, "leading", "eps"), (10, "trailing", "eps"),
         (25, "linspace", "eps"), (10, "leading", "v"), (25, "trailing", "v")]


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("steps,spacing,prediction", CASES)
def test_dpmpp_2m_matches_diffusers(steps, spacing, prediction):
    diffusers = pytest.importorskip("diffusers")
    s, x_T = sd_schedule(), x_T_sd()
    sched = diffusers.DPMSolverMultistepScheduler(**SD15, timestep_spacing=spacing,
                                                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    ref, ref_t = diffusers_loop(sched, x_T, steps)
    records = list(dpmpp_2m(linear_model, s, x_T, num_inference_steps=steps, spacing=spacing, steps_offset=1,
                            prediction=prediction))
    assert [r.t for r in records] == ref_t.tolist() == sampler_timesteps("dpm++2m", s, steps, spacing, 1).tolist()
    assert rel_err(records[-1].x_prev, ref) < 1e-5


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("steps", [10, 20])  # < 15 steps: first-order last step; ≥ 15: second order
def test_dpmpp_2m_final_sigma_min_matches_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    s, x_T = sd_schedule(), x_T_sd()
    ref, _ = diffusers_loop(diffusers.DPMSolverMultistepScheduler(**SD15, timestep_spacing="leading", final_sigmas_type="sigma_min"),
                            x_T, steps)
    ours = sample(linear_model, s, x_T.shape, x_T=x_T, sampler="dpm++2m", num_inference_steps=steps, steps_offset=1,
                  final_alpha_bar=s.alpha_bar_f64[0].item(), progress=False)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("ancestral", [False, True], ids=["euler", "euler_a"])
@pytest.mark.parametrize("steps,spacing,prediction", CASES)
def test_euler_matches_diffusers(ancestral, steps, spacing, prediction):
    """Same final latents, and for the ancestral sampler the same noise draws: the generators end in the same state."""
    diffusers = pytest.importorskip("diffusers")
    s, x_T = sd_schedule(), x_T_sd()
    cls = diffusers.EulerAncestralDiscreteScheduler if ancestral else diffusers.EulerDiscreteScheduler
    sched = cls(**SD15, timestep_spacing=spacing, prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref, ref_t = diffusers_loop(sched, x_T, steps, generator=g_ref)
    records = list(euler(linear_model, s, x_T, num_inference_steps=steps, spacing=spacing, steps_offset=1,
                         prediction=prediction, generator=g_ours, ancestral=ancestral))
    assert [float(r.t) for r in records] == ref_t.tolist() == sampler_timesteps("euler_a", s, steps, spacing, 1).tolist()
    assert rel_err(records[-1].x_prev, ref) < 1e-5
    assert torch.equal(g_ours.get_state(), g_ref.get_state())


@pytest.mark.reference
@quiet_numpy
@pytest.mark.parametrize("name", ["dpm++2m", "euler", "euler_a"])
def test_img2img_from_model_space_matches_diffusers(name):
    """The caller noises x0 with ldm's q_sample and passes diffusers' remaining timesteps; no σ-space in sight."""
    diffusers = pytest.importorskip("diffusers")
    cls = {"dpm++2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
           "euler_a": diffusers.EulerAncestralDiscreteScheduler}[name]
    s, steps, start = sd_schedule(), 10, 4
    x0, noise = 0.5 * x_T_sd(1), x_T_sd(2)
    ref, ref_t = diffusers_loop(cls(**SD15, timestep_spacing="leading"), None, steps, start, x0, noise, torch.Generator().manual_seed(7))
    timesteps = ref_t.long()
    x_t = q_sample(s, x0, timesteps[:1].expand(len(x0)), noise)
    ours = sample(linear_model, s, x0.shape, x_T=x_t, sampler=name, num_inference_steps=steps, timesteps=timesteps,
                  generator=torch.Generator().manual_seed(7), progress=False)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.reference
@quiet_numpy
def test_diffusers_euler_init_noise_sigma_quirk():
    """diffusers scales x_T by σ_max, not √(1 + σ_max²), under "trailing"/"linspace" (and by the latter under
    "leading"); x_T ~ N(0, I) in model space means x_σ = x_T · √(1 + σ²), which is what ldm's Euler uses.

    So: ldm's σ_max is diffusers' σ_max; ldm's first step starts from x_σ = x_T · √(1 + σ_max²) under every spacing
    (seen through a model predicting x̂_0 = 0, where one Euler step is x_σ' = x_σ · σ'/σ); and ldm's run matches
    diffusers' when diffusers is started from x_T · √(1 + σ_max²), not from x_T · ``init_noise_sigma``.
    """
    diffusers = pytest.importorskip("diffusers")
    s, x_T, steps = sd_schedule(), x_T_sd(), 10
    zero_x0 = lambda x, t, cond: torch.zeros_like(x)

    def diffusers_from(sched, scale):
        sched.set_timesteps(steps)
        latents = x_T * scale
        for t in sched.timesteps:
            latents = sched.step(linear_model(sched.scale_model_input(latents, t), t), t, latents).prev_sample
        return latents

    for spacing, extra in (("leading", 1.0), ("trailing", 0.0), ("linspace", 0.0)):
        sched = diffusers.EulerDiscreteScheduler(**SD15, timestep_spacing=spacing)
        sched.set_timesteps(steps)
        sigma_max = sched.sigmas.max()
        assert torch.isclose(sched.init_noise_sigma, (sigma_max**2 + extra) ** 0.5)  # diffusers' quirk

        sigmas = sigmas_at(s, euler_timesteps(s, steps, spacing, 1))
        assert sigmas[0].item() == pytest.approx(sigma_max.item(), rel=1e-5)
        sig0, sig1 = sigmas[0].item(), sigmas[1].item()
        first = next(euler(zero_x0, s, x_T, num_inference_steps=steps, spacing=spacing, steps_offset=1, prediction="x0"))
        # x_σ = x_T · √(1 + σ_0²) → x_σ' = x_σ · σ_1/σ_0 → back to model space: x_σ' / √(1 + σ_1²)
        expected = x_T * ((1 + sig0**2) ** 0.5 * sig1 / (sig0 * (1 + sig1**2) ** 0.5))
        assert torch.allclose(first.x_prev, expected, rtol=1e-5, atol=0), spacing

        ours = sample(linear_model, s, x_T.shape, x_T=x_T, sampler="euler", num_inference_steps=steps, spacing=spacing,
                      steps_offset=1, progress=False)
        assert rel_err(ours, diffusers_from(sched, (sigma_max**2 + 1) ** 0.5)) < 1e-5, spacing
        if extra == 0.0:  # starting from init_noise_sigma = σ_max instead is a different (too quiet) run
            assert rel_err(ours, diffusers_from(sched, sched.init_noise_sigma)) > 1e-4, spacing


def test_euler_is_ddim_in_sigma_space():
    """Unclipped, Euler = DDIM η = 0 and Euler ancestral = DDIM η = 1 (same noise) on the same timesteps; the first
    DPM-Solver++ step (first order) is a DDIM step too."""
    s, x_T = sd_schedule(), x_T_sd()
    ts = s.timesteps(10, "leading", 1)
    run = lambda loop, **kw: list(loop(linear_model, s, x_T, timesteps=ts, generator=torch.Generator().manual_seed(5), **kw))
    assert rel_err(run(euler)[-1].x_prev, run(ddim)[-1].x_prev) < 1e-5
    assert rel_err(run(euler_ancestral)[-1].x_prev, run(ddim, eta=1.0)[-1].x_prev) < 1e-5
    assert rel_err(run(dpmpp_2m)[0].x_prev, run(ddim)[0].x_prev) < 1e-6
    assert rel_err(run(dpmpp_2m)[1].x_prev, run(ddim)[1].x_prev) > 1e-4  # the second-order correction is on


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["dpm++2m", "euler", "euler_a"])
def test_few_step_samplers_land_on_a_point_mass(name, spacing):
    """With the perfect denoiser for data x0 = target (the ε implied by x_t, or x̂_0 itself), every run ends on target."""
    s = sd_schedule()
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    # Euler's "linspace" timesteps are fractional, where ᾱ (hence the true ε) is the sampler's own interpolation.
    prediction = "x0" if spacing == "linspace" and name != "dpm++2m" else "eps"

    def oracle(x, t, c):
        if prediction == "x0":
            return target.expand_as(x)
        ab = gather(s.alpha_bar, t, x)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    for steps in (4, 20):
        x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(steps))
        out = sample(oracle, s, x_T.shape, x_T=x_T, sampler=name, num_inference_steps=steps, spacing=spacing,
                     prediction=prediction, generator=torch.Generator().manual_seed(0), progress=False)
        assert torch.allclose(out, target.expand_as(out), atol=1e-4)


@pytest.mark.parametrize("name", ["dpm++2m", "euler", "euler_a"])
def test_few_step_samplers_yield_chained_records_and_reproduce(name):
    s, x_T = sd_schedule(), x_T_sd()
    run = lambda seed: list(SAMPLERS[name](linear_model, s, x_T, num_inference_steps=6, steps_offset=1,
                                           generator=torch.Generator().manual_seed(seed)))
    records = run(0)
    assert [r.index for r in records] == list(range(6))
    assert torch.equal(records[0].x_t, x_T)
    for prev, nxt in zip(records, records[1:]):
        assert torch.equal(prev.x_prev, nxt.x_t)
    assert torch.equal(run(0)[-1].x_prev, records[-1].x_prev)
    assert torch.equal(run(1)[-1].x_prev, records[-1].x_prev) == (name != "euler_a")


def test_sampler_timesteps_differ_as_diffusers_schedulers_do():
    s = sd_schedule()
    assert torch.equal(sampler_timesteps("ddim", s, 10, "leading", 1), s.timesteps(10, "leading", 1))  # 901, 801, … 1
    assert dpm_solver_timesteps(s, 10, "leading", 1).tolist() == list(range(901, 90, -90))  # ⌊1000/11⌋ = 90: 901 … 91
    assert torch.equal(dpm_solver_timesteps(s, 10, "trailing"), s.timesteps(10, "trailing"))
    assert euler_timesteps(s, 25, "linspace")[1].item() == 957.375  # 999 · 23/24, not rounded
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_timesteps("plms", s, 10)


@pytest.mark.reference
def test_guidance_rescale_matches_diffusers():
    sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    torch.manual_seed(0)
    cond_out, uncond_out = torch.randn(2, 4, 8, 8) * 2, torch.randn(2, 4, 8, 8)

    def model(x, t, c):  # returns the conditional output for the first half of the batch, the other for the second
        return torch.cat([cond_out, uncond_out])

    x, t, c = torch.zeros(2, 4, 8, 8), torch.tensor([5, 5]), torch.zeros(2, 3)
    guided = classifier_free_guidance(model, 7.5, torch.zeros(1, 3), rescale=0.7)(x, t, c)
    cfg = uncond_out + 7.5 * (cond_out - uncond_out)
    expected = sd.rescale_noise_cfg(cfg, cond_out, guidance_rescale=0.7)
    assert torch.allclose(guided, expected, atol=1e-5)
    assert not torch.allclose(guided, cfg, atol=1e-2)
