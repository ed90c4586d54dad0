"""Tests of gorl_diffusion.py: the identity decoder at initialization, the encoder's re-initialization
to the prior, the diffusion loss (Eq. 17), DDIM against its textbook form, a bimodal fit, and a
2-stage smoke run with resume."""

import csv
import dataclasses
import json
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import running  # noqa: E402
import gorl_diffusion as gd  # noqa: E402

OBS, ACT, B, T = 5, 3, 64, 10
ARGS = gd.resolve(gd.Args())


def _hand_alpha_bar(num_steps=T, s=0.008):
    """The capped cosine schedule written out step by step in float64, abar_0 = 1 .. abar_T."""
    f = [math.cos((k / num_steps + s) / (1 + s) * math.pi / 2) ** 2 for k in range(num_steps + 1)]
    abar = [1.0]
    for k in range(1, num_steps + 1):
        abar.append(abar[-1] * (1.0 - min(1.0 - f[k] / f[k - 1], 0.999)))
    return np.array(abar)


def _hand_linear_alpha_bar(num_steps=T):
    """The released code's schedule: abar falls linearly from 1 to 1e-3 over t / T."""
    return np.array([1e-3 + (1 - 1e-3) * (1 - k / num_steps) for k in range(num_steps + 1)])


HAND_ALPHA_BAR = {"cosine": _hand_alpha_bar, "linear": _hand_linear_alpha_bar}


def _hand_skip(abar):
    """c_t from the angle form of the derivation: abar = cos^2(theta), c_t = sin(mid) / cos(half)."""
    theta = np.arccos(np.sqrt(abar))
    mid, half = (theta[:-1] + theta[1:]) / 2, (theta[1:] - theta[:-1]) / 2
    return np.concatenate([[0.0], np.sin(mid) / np.cos(half)])


def _textbook_ddim(eps_fn, x_T, abar, clip=None):
    """DDIM, eta = 0, in float64 as Song et al. write it: estimate x_0 from the predicted noise,
    (clip it and recompute the noise from it), then move to the next noise level."""
    x = np.asarray(x_T, np.float64)
    for t in range(len(abar) - 1, 0, -1):
        eps = np.asarray(eps_fn(x, t), np.float64)
        x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
            eps = (x - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
        x = np.sqrt(abar[t - 1]) * x0 + np.sqrt(1 - abar[t - 1]) * eps
    return x


def _random_decoder(seed, scale=0.3):
    """A decoder as after some training: the zero output layer replaced by a random one."""
    k_init, k_w = jax.random.split(jax.random.PRNGKey(seed))
    params = gd.init_decoder(k_init, OBS, ACT, ARGS)
    params[-1] = {"w": scale * jax.random.normal(k_w, params[-1]["w"].shape), "b": jnp.full(ACT, 0.1)}
    return params


# ---------------------------------------------------------------------------------------------
# Schedule and identity at initialization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_matches_its_formula_and_the_derivation(schedule):
    sched = gd.diffusion_schedule(T, "x0", schedule)
    abar = HAND_ALPHA_BAR[schedule]()
    np.testing.assert_allclose(sched["alpha_bar"], abar, rtol=1e-6)
    np.testing.assert_allclose(sched["skip"][1:], _hand_skip(abar)[1:], rtol=1e-6)
    assert np.all(np.asarray(sched["skip"][1:]) > 0) and np.all(np.asarray(sched["skip"][1:]) < 1)
    # A zero noise estimate alone would scale z by 1 / sqrt(abar_T) (about 31 linear, 204 cosine):
    # the skip is needed.
    assert 1 / math.sqrt(abar[-1]) > 30


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("decoder_output", ["eps", "x0"])
def test_decoder_is_the_identity_at_initialization(decoder_output, schedule):
    """Bound reached: 0. g(s, z) == z bit for bit for |z_i| <= denoised_clip (any z without the
    clip); beyond the clip it is sign(z_i) * clip, where tanh differs from tanh(z_i) by < 1e-4."""
    args = gd.resolve(gd.Args(decoder_output=decoder_output, noise_schedule=schedule))
    sched = gd.diffusion_schedule(args.diffusion_steps, decoder_output, schedule)
    k_dec, k_obs, k_z = jax.random.split(jax.random.PRNGKey(0), 3)
    params = gd.init_decoder(k_dec, OBS, ACT, args)
    obs = 3.0 * jax.random.normal(k_obs, (B, OBS))
    clip = args.denoised_clip
    z = jnp.clip(2.0 * jax.random.normal(k_z, (B, ACT)), -clip, clip)
    z = z.at[0].set(jnp.array([clip, -clip, 1e-7]))  # the clip's edges are still exact
    np.testing.assert_array_equal(gd.decode(params, obs, z, sched, clip), z)
    big = 1e4 * jax.random.normal(k_z, (B, ACT))
    np.testing.assert_array_equal(gd.decode(params, obs, big, sched, None), big)
    far = jnp.array([[7.0, -20.0, 1e3]])
    out = gd.decode(params, obs[:1], far, sched, clip)
    np.testing.assert_allclose(out, jnp.sign(far) * clip, rtol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.tanh(out) - jnp.tanh(far)))) < 1e-4
    # The identity comes from the noise predictor, not from skipping it: at initialization eps_phi
    # is c_t x_t, and textbook DDIM with that prediction returns z up to float64 rounding.
    t = jnp.full(B, 7)
    np.testing.assert_allclose(gd.predict_noise(params, obs, z, t, sched), sched["skip"][7] * z, rtol=1e-6)
    abar = HAND_ALPHA_BAR[schedule]()
    c = _hand_skip(abar)
    np.testing.assert_allclose(_textbook_ddim(lambda x, t: c[t] * x, z, abar), z, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("decoder_output", ["eps", "x0"])
def test_ddim_is_textbook_ddim_for_a_nonzero_network(decoder_output, schedule):
    """decode's x_{t-1} = x_t + B_t f (+ clip correction) is Song et al.'s DDIM with the eps_phi
    that Eq. (17) trains: sampling and training use the same noise predictor."""
    sched = gd.diffusion_schedule(T, decoder_output, schedule)
    abar = HAND_ALPHA_BAR[schedule]()
    params = _random_decoder(1)
    obs = jax.random.normal(jax.random.PRNGKey(2), (B, OBS))
    z = jax.random.normal(jax.random.PRNGKey(3), (B, ACT))

    def eps_fn(x, t):
        return gd.predict_noise(params, obs, jnp.asarray(x, jnp.float32), jnp.full(B, t), sched)

    for clip in (None, 1.0):
        got = gd.decode(params, obs, z, sched, clip)
        want = _textbook_ddim(eps_fn, z, abar, clip)
        # B_T ~ -31 amplifies float32 rounding of the first step; 1e-3 is still far below a bug.
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # The clip is active in that case (the network's estimates go beyond 1), and bounds the action.
    clipped = gd.decode(params, obs, z, sched, 1.0)
    assert float(jnp.max(jnp.abs(clipped))) <= 1.0 + 1e-6
    assert not np.allclose(clipped, gd.decode(params, obs, z, sched, None))


def test_ddim_with_a_perfect_noise_predictor_recovers_the_clean_action():
    sched = gd.diffusion_schedule(T, "x0", "cosine")
    abar = _hand_alpha_bar()
    k_a, k_xi = jax.random.split(jax.random.PRNGKey(4))
    a0 = 1.5 * jax.random.normal(k_a, (B, ACT))
    xi = jax.random.normal(k_xi, (B, ACT))
    x_T = math.sqrt(abar[-1]) * a0 + math.sqrt(1 - abar[-1]) * xi

    def residual(x, t):  # eps_phi = xi, the true noise, written as the network's part f = eps - c_t x
        return xi - sched["skip"][t] * x

    for clip in (None, 5.0):
        a_hat = gd.ddim(residual, x_T, sched, clip)
        np.testing.assert_allclose(a_hat, a0, atol=2e-4)
    # A wrong noise (here: none) does not recover it: the test can fail.
    assert float(jnp.max(jnp.abs(gd.ddim(lambda x, t: -sched["skip"][t] * x, x_T, sched, None) - a0))) > 0.5


# ---------------------------------------------------------------------------------------------
# The diffusion loss (Eq. 17) and refinement inputs
# ---------------------------------------------------------------------------------------------


def test_diffusion_loss_shapes_and_value(monkeypatch):
    sched = gd.diffusion_schedule(T, "x0", "linear")
    abar = _hand_linear_alpha_bar()
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    obs = jax.random.normal(k[0], (B, OBS))
    actions = 2.0 * jax.random.normal(k[1], (B, ACT))
    xi = jax.random.normal(k[2], (B, ACT))
    t = jax.random.randint(k[3], (B,), 1, T + 1)
    params = gd.init_decoder(jax.random.PRNGKey(6), OBS, ACT, ARGS)

    # Zero network: eps_phi = c_t x_t, x_t from the forward process (Eq. 16), computed here by hand.
    a_t, b_t = np.sqrt(abar[np.asarray(t)])[:, None], np.sqrt(1 - abar[np.asarray(t)])[:, None]
    x_t = a_t * np.asarray(actions) + b_t * np.asarray(xi)
    want = np.mean(np.sum((np.asarray(xi) - _hand_skip(abar)[np.asarray(t)][:, None] * x_t) ** 2, axis=-1))
    loss, grads = jax.value_and_grad(gd.diffusion_loss)(params, obs, actions, xi, t, sched)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(np.asarray(grads[-1]["w"]) != 0)

    # A perfect noise predictor inverts the forward process with the true action: loss 0.
    def oracle(params, obs, x_t, t, sched, delta=0.0):
        return (x_t - np.sqrt(abar[np.asarray(t)])[:, None] * actions) / np.sqrt(1 - abar[np.asarray(t)])[:, None] + delta

    monkeypatch.setattr(gd, "predict_noise", oracle)
    assert float(gd.diffusion_loss(params, obs, actions, xi, t, sched)) < 1e-8
    monkeypatch.setattr(gd, "predict_noise", lambda *a: oracle(*a, delta=0.1))
    np.testing.assert_allclose(gd.diffusion_loss(params, obs, actions, xi, t, sched), ACT * 0.01, rtol=1e-3)


def test_refinement_inputs_prior_and_encoder_latents():
    batch = {"action": jnp.ones((4096, ACT)), "latent": jnp.full((4096, ACT), 3.0)}
    xi, t = gd.refinement_inputs(batch, jax.random.PRNGKey(7), 2, T, "prior")
    assert xi.shape == (2, 4096, ACT) and t.shape == (2, 4096)
    assert abs(float(xi.mean())) < 0.05 and abs(float(xi.std()) - 1.0) < 0.05  # fresh N(0, I)
    assert int(t.min()) == 1 and int(t.max()) == T  # U{1..T}, both ends reached
    xi, _ = gd.refinement_inputs(batch, jax.random.PRNGKey(7), 2, T, "encoder")
    np.testing.assert_array_equal(xi, np.broadcast_to(batch["latent"], (2, 4096, ACT)))


# ---------------------------------------------------------------------------------------------
# Encoder re-initialization
# ---------------------------------------------------------------------------------------------


def test_encoder_reinitialization_is_the_prior():
    args = ARGS
    obs = 5.0 * jax.random.normal(jax.random.PRNGKey(8), (B, OBS))
    trained = common.mlp_init(jax.random.PRNGKey(9), [OBS, *args.encoder_hidden, 2 * ACT])  # not the prior
    mean, scale = gd.encoder(trained, obs)
    assert float(jnp.max(jnp.abs(mean))) > 1e-2
    for seed in (10, 11):
        mean, scale = gd.encoder(gd.init_encoder(jax.random.PRNGKey(seed), OBS, ACT, args), obs)
        np.testing.assert_array_equal(mean, 0.0)
        np.testing.assert_allclose(scale, 1.0, rtol=1e-6)
        np.testing.assert_allclose(common.kl_to_standard_normal(mean, scale), 0.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A decoder fitted to a bimodal action distribution generates both modes
# ---------------------------------------------------------------------------------------------


def test_decoder_fits_a_bimodal_distribution():
    """Actions at +-center(s) + 0.3 noise, the mode a fair coin; Eq. (17) with prior noise, then
    DDIM from prior latents. The identity decoder (a Gaussian) puts ~35% of its mass between
    the modes; the fitted decoder must put both modes' mass where they are."""
    args = ARGS
    sched = gd.diffusion_schedule(args.diffusion_steps, args.decoder_output, args.noise_schedule)
    direction = jnp.array([2.0, -1.5, 1.0])

    def data(key, n):
        k_obs, k_mode, k_noise = jax.random.split(key, 3)
        obs = jax.random.normal(k_obs, (n, OBS))
        mode = jnp.where(jax.random.bernoulli(k_mode, 0.5, (n, 1)), 1.0, -1.0)
        center = 0.5 * obs[:, :ACT]  # the modes move with the state: the decoder must condition on it
        return obs, center + mode * direction + 0.3 * jax.random.normal(k_noise, (n, ACT))

    optimizer = optax.adam(1e-3)

    def update(carry, key):
        params, opt_state = carry
        k_data, k_inputs = jax.random.split(key)
        obs, actions = data(k_data, 512)
        xi, t = gd.refinement_inputs({"action": actions}, k_inputs, 1, args.diffusion_steps)
        loss, grads = jax.value_and_grad(gd.diffusion_loss)(params, obs, actions, xi, t, sched)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def fit(params, key):
        (params, _), losses = jax.lax.scan(update, (params, optimizer.init(params)), jax.random.split(key, 1500))
        return params, losses

    params0 = gd.init_decoder(jax.random.PRNGKey(12), OBS, ACT, args)
    params, losses = fit(params0, jax.random.PRNGKey(13))
    assert float(losses[-100:].mean()) < 0.8 * float(losses[:100].mean())

    obs, _ = data(jax.random.PRNGKey(14), 4000)
    z = jax.random.normal(jax.random.PRNGKey(15), (4000, ACT))

    def mode_stats(actions):
        offset = actions - 0.5 * obs[:, :ACT]
        proj = offset @ direction / jnp.dot(direction, direction)  # +1 / -1 at the two modes
        positive = float(jnp.mean(proj > 0))
        between = float(jnp.mean(jnp.abs(proj) < 0.5))
        residual = offset - jnp.sign(proj)[:, None] * direction
        return positive, between, float(jnp.sqrt(jnp.mean(residual**2)))

    _, between0, _ = mode_stats(gd.decode(params0, obs, z, sched, args.denoised_clip))
    assert between0 > 0.25  # the identity decoder does not have the modes
    positive, between, spread = mode_stats(gd.decode(params, obs, z, sched, args.denoised_clip))
    # Both modes, in comparable measure. (A few seconds of fitting leaves the balance at 0.55-0.70
    # over seeds, from errors at t = T that DDIM amplifies ~30x; 6000 steps bring it to 0.43-0.48.)
    assert 0.2 < positive < 0.8, positive
    assert between < 0.1, between  # little mass between them
    assert spread < 0.6, spread  # each mode about as narrow as the data's (0.3)


# ---------------------------------------------------------------------------------------------
# Flags and a 2-stage smoke run with resume
# ---------------------------------------------------------------------------------------------


def test_bad_flags_are_clear_errors_before_compilation():
    for bad in (dict(episode_length=-1), dict(diffusion_steps=0), dict(denoised_clip=-1.0),
                dict(refine_latents="decoder"), dict(decoder_output="v"), dict(stage_steps=(10,)),
                dict(noise_schedule="quadratic"), dict(learning_rate=(1e-3, -1.0)), dict(refine_epochs=0),
                dict(env_name="CartpoleBalance", refine_envs=1, refine_episodes=2, refine_batch_size=4096)):
        with pytest.raises(SystemExit):
            gd.validate(gd.resolve(gd.Args(**bad)))


@pytest.mark.slow
def test_smoke_run_two_stages_and_resume(tmp_path):
    args = gd.Args(
        env_name="CartpoleBalance", num_envs=16, batch_size=16, num_minibatches=2, unroll_length=10,
        num_epochs=2, stage_steps=(320, 320), refine_envs=4, refine_episodes=4, refine_batch_size=512,
        refine_epochs=2, refine_eval_every=5, refine_draws=2, refine_val_size=1000, eval_every=320,
        num_eval_envs=4, runs_dir=str(tmp_path),
    )
    gd.main(args)
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["algo"] == "gorl_diffusion"
    with open(os.path.join(run_dir, "stages.md")) as f:
        table = f.read()
    assert "| S0 | 320 |" in table and "| S1 | 640 |" in table
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("loss/total")]
    assert [int(r["step"]) for r in train] == [320, 640]
    assert all(math.isfinite(float(r["eval/return"])) for r in train)
    refine = [r for r in rows if r.get("refine/loss_final")]
    assert len(refine) == 1 and int(refine[0]["step"]) == 320
    assert math.isfinite(float(refine[0]["refine/loss_final"]))
    assert os.listdir(os.path.join(run_dir, "tb"))
    ckpt = {m: running.load_checkpoint(os.path.join(run_dir, "checkpoints", f"stage{m}.npz")) for m in (0, 1)}
    assert int(ckpt[0]["step"]) == 320 and int(ckpt[1]["step"]) == 640
    # Stage 0 ran with the identity decoder (zero output layer); refinement changed it for stage 1.
    assert np.all(np.asarray(ckpt[0]["decoder"][-1]["w"]) == 0)
    assert np.any(np.asarray(ckpt[1]["decoder"][-1]["w"]) != 0)
    # The density helper: bounded actions from a saved stage; from stage 0's identity decoder
    # with prior latents they are exactly tanh of standard-normal draws.
    key = jax.random.PRNGKey(0)
    obs = jnp.zeros(ckpt[0]["norm"].mean.shape)
    mean, scale = gd.encoder(ckpt[0]["params"]["encoder"], common.normalize(ckpt[0]["norm"], jnp.zeros((256, obs.shape[-1]))))
    np.testing.assert_allclose(gd.sample_actions(ckpt[0], obs, key, 256),
                               jnp.tanh(mean + scale * jax.random.normal(key, mean.shape)), atol=1e-6)
    refined = gd.sample_actions(ckpt[1], obs, key, 256, from_prior=True)
    assert refined.shape == (256, 1) and float(jnp.abs(refined - jnp.tanh(jax.random.normal(key, (256, 1)))).max()) > 1e-4
    np.testing.assert_array_equal(gd.sample_actions(ckpt[0], obs, key, 256, from_prior=True),
                                  jnp.tanh(jax.random.normal(key, (256, 1))))

    # Resume after stage 0: the refinement and stage 1 run again from the saved key, same result.
    os.remove(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    gd.main(gd.Args(resume=run_dir))
    again = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    assert int(again["step"]) == 640
    np.testing.assert_allclose(again["decoder"][-1]["w"], ckpt[1]["decoder"][-1]["w"], rtol=1e-5, atol=1e-6)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("loss/total")] == [320, 640]
    shutil.rmtree(run_dir)


# ---------------------------------------------------------------------------------------------
# Defaults as released (configs/methods/gorl_diffusion.toml, dm_control profile)
# ---------------------------------------------------------------------------------------------

RELEASED_DIFFUSION = dict(
    stage_steps=(60_000_000, 60_000_000, 30_000_000, 30_000_000), num_envs=2048, unroll_length=30,
    batch_size=1024, num_minibatches=32, num_epochs=16, learning_rate=(1e-3, 3e-4, 1e-4), discount=0.995,
    gae_lambda=0.95, vf_coef=0.25, ent_coef=(0.01,), reward_scaling=10.0, clip_eps=(0.15,), max_grad_norm=(0.5,),
    kl_beta=(5e-4, 1e-3), encoder_reset=False,
    decoder_hidden=(64,) * 4, diffusion_steps=10, noise_schedule="linear", refine_episodes=4096,
    refine_epochs=50, refine_batch_size=8192, refine_draws=8, refine_learning_rate=3e-4, pairwise_weight=1e-3,
    decoder_target_clip=3.0, decoder_init="fresh", refine_val_fraction=0.1, refine_metric="val_loss",
    deterministic_eval=True, action_semantics="pre_squash", bounded_latent=False,
)


@pytest.mark.parametrize("field", sorted(RELEASED_DIFFUSION))
def test_defaults_are_the_released_values(field):
    assert getattr(gd.resolve(gd.Args(env_name="CheetahRun")), field) == RELEASED_DIFFUSION[field]


def test_refinement_collects_all_episodes_at_once_by_default():
    """A documented departure: the release collects its 4096 episodes 64 environments at a time
    (64 sequential episodes); ours run as one batched rollout unless --refine-envs says otherwise."""
    assert gd.Args().refine_envs is None
    gd.validate(gd.resolve(gd.Args(env_name="CheetahRun", refine_envs=64)))


def test_refinement_steps_count_epochs_as_released():
    # 4096 episodes, 409 held out: 3,687,000 training transitions, 450 batches of 8192 per epoch.
    assert gd.refine_steps(ARGS) == 50 * 450
    # Episodes of another length (a user's environment, --episode-length) change the count.
    short = dataclasses.replace(ARGS, episode_length=500, refine_eval_every=1)
    assert gd.refine_steps(short) == 50 * (3687 * 500 // 8192)
    humanoid = gd.resolve(gd.Args(env_name="HumanoidRun"))
    assert humanoid.decoder_hidden == (128,) * 4 and humanoid.clip_eps == (0.3,) and humanoid.bounded_latent


def test_fishswim_lowers_the_entropy_weight_in_stage_3_as_released():
    """configs/tasks/FishSwim.toml: [method_overrides.gorl_diffusion.ppo.stage3] entropy_cost 0.005."""
    fish = gd.resolve(gd.Args(env_name="FishSwim"))
    assert [float(gd.stage_hyperparameters(fish, m)["ent_coef"]) for m in range(5)] == pytest.approx(
        [0.01, 0.01, 0.01, 0.005, 0.005])
    assert ARGS.ent_coef == (0.01,)
    # The stage's weight is the one in the loss: -ent_coef * entropy.
    obs, latent = 3, 2
    params = {"encoder": gd.init_encoder(jax.random.PRNGKey(0), obs, latent, fish),
              "critic": common.mlp_init(jax.random.PRNGKey(1), [obs, 16, 1])}
    rng = np.random.default_rng(0)
    batch = {"obs": jnp.asarray(rng.normal(size=(32, obs)), jnp.float32),
             "latent": jnp.asarray(rng.normal(size=(32, latent)), jnp.float32),
             "log_prob": jnp.zeros(32), "advantage": jnp.asarray(rng.normal(size=32), jnp.float32), "target": jnp.zeros(32)}
    hp = gd.stage_hyperparameters(fish, 3)
    loss, metrics = gd.latent_ppo_loss(params, batch, hp, fish)
    loss_without, _ = gd.latent_ppo_loss(params, batch, dict(hp, ent_coef=jnp.float32(0.0)), fish)
    assert abs(float(metrics["encoder/entropy"])) > 0.5
    np.testing.assert_allclose(float(loss_without - loss), 0.005 * float(metrics["encoder/entropy"]), rtol=1e-4)


def test_hopperstand_stage_0_normalizer_is_the_releases_legacy_one():
    """configs/tasks/HopperStand.toml [method_overrides.gorl_diffusion.ppo.stage0]: the
    statistics updated before the epochs, the variance of the newest batch only; later stages and
    other tasks: after the epochs, running."""
    hopper = gd.resolve(gd.Args(env_name="HopperStand"))
    hp = [gd.stage_hyperparameters(hopper, m) for m in range(3)]
    assert [float(h["normalizer_before"]) for h in hp] == [1.0, 0.0, 0.0]
    assert [float(h["normalizer_keep_variance"]) for h in hp] == [0.0, 1.0, 1.0]
    cheetah = gd.resolve(gd.Args(env_name="CheetahRun"))
    assert (cheetah.normalizer_update, cheetah.normalizer_variance) == (("after",), ("running",))


def test_each_stage_gets_its_learning_rate_without_a_recompile():
    rates = [float(gd.stage_hyperparameters(ARGS, m)["learning_rate"]) for m in range(4)]
    np.testing.assert_allclose(rates, [1e-3, 3e-4, 1e-4, 1e-4], rtol=1e-6)
    # The rate is an array argument of the compiled update: Adam's first step is lr * sign(grad).
    params = {"w": jnp.ones(3)}
    optimizer = optax.scale_by_adam()

    @jax.jit
    def first_step(hp):
        updates, _ = optimizer.update({"w": -jnp.ones(3)}, optimizer.init(params), params)
        return jax.tree.map(lambda u: -hp["learning_rate"] * u, updates)["w"]

    for stage, rate in ((0, 1e-3), (2, 1e-4)):
        np.testing.assert_allclose(first_step(gd.stage_hyperparameters(ARGS, stage)), rate, rtol=1e-3)
    assert first_step._cache_size() == 1


def test_pairwise_loss_adds_the_reconstruction_of_the_encoders_action():
    """pairwise_weight * mean((g(s, z_enc) - a)^2): zero weight gives Eq. (17) alone; for the
    identity decoder g(s, z_enc) = z_enc, so the term is the mean squared gap between latent and action."""
    import types
    env = types.SimpleNamespace(observation_size=OBS, action_size=ACT, episode_length=common.EPISODE_LENGTH)
    rng = np.random.default_rng(0)
    n = 2000
    dataset = {"obs": jnp.asarray(rng.normal(size=(n, 1, OBS)), jnp.float32),
               "action": jnp.asarray(rng.normal(size=(n, 1, ACT)), jnp.float32),
               "latent": jnp.asarray(rng.normal(size=(n, 1, ACT)), jnp.float32)}
    vals = {}
    for w in (0.0, 0.5):
        args = gd.resolve(gd.Args(pairwise_weight=w, refine_envs=1, refine_episodes=2, refine_epochs=1,
                                  refine_batch_size=100, refine_eval_every=10, refine_learning_rate=0.0,
                                  refine_val_size=1000, refine_draws=2))
        _, fit = gd.make_refinement(env, args)
        _, _, metrics = fit(None, dataset, jax.random.PRNGKey(0))
        vals[w] = float(metrics["refine/val_initial"])
    gap = np.mean((np.asarray(dataset["latent"]) - np.asarray(dataset["action"])) ** 2)
    assert abs((vals[0.5] - vals[0.0]) / 0.5 - gap) < 0.1 * gap
