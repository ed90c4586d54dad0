"""Tests of gorl_sac.py: the replay ring, the SAC losses and target update, the prior-initialized
encoder, the identity-initialized DDIM decoder, flag validation, and a two-stage smoke run with a
resume. The Brax Hopper environment test compiles for over a minute on a small CPU: it runs only
with GORL_SLOW_TESTS=1."""

import csv
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
import running  # noqa: E402
import gorl_sac  # noqa: E402

OBS, LATENT, B = 5, 3, 7


def _small_args(**overrides):
    return gorl_sac.Args(encoder_hidden=(16, 16), critic_hidden=(16, 16), batch_size=B, **overrides)


# ---------------------------------------------------------------------------------------------
# Replay ring
# ---------------------------------------------------------------------------------------------


def _numbered(start, n):
    """n transitions whose every field encodes its sequence number."""
    ids = jnp.arange(start, start + n, dtype=jnp.float32)
    return {"obs": jnp.stack([ids, -ids], axis=-1), "reward": ids}


def test_replay_ring_keeps_last_n_in_order_across_wrap_around():
    capacity, batch = 10, 3
    buffer = gorl_sac.replay_init(capacity, _numbered(0, 1))
    add = jax.jit(gorl_sac.replay_add)
    seen = 0
    for i in range(9):  # 27 transitions: wraps around the 10 rows twice, not at a batch boundary
        buffer = add(buffer, _numbered(seen, batch))
        seen += batch
        expected = np.arange(max(0, seen - capacity), seen, dtype=np.float32)
        stored = gorl_sac.replay_in_order(buffer)
        assert int(buffer["size"]) == min(seen, capacity)
        assert int(buffer["position"]) == seen % capacity
        np.testing.assert_array_equal(stored["reward"], expected)
        np.testing.assert_array_equal(stored["obs"], np.stack([expected, -expected], axis=-1))
    # Sampling only ever returns stored transitions, with fields of the same row together.
    sample = gorl_sac.replay_sample(buffer, jax.random.PRNGKey(0), 500)
    assert set(np.asarray(sample["reward"]).tolist()) == set(range(seen - capacity, seen))
    np.testing.assert_array_equal(sample["obs"][:, 0], sample["reward"])


def test_replay_sample_uses_only_filled_rows():
    buffer = gorl_sac.replay_add(gorl_sac.replay_init(100, _numbered(0, 1)), _numbered(1, 4))
    sample = gorl_sac.replay_sample(buffer, jax.random.PRNGKey(1), 1000)
    assert set(np.asarray(sample["reward"]).tolist()) == {1.0, 2.0, 3.0, 4.0}


# ---------------------------------------------------------------------------------------------
# SAC: losses, target update, re-initialized encoder
# ---------------------------------------------------------------------------------------------


def _sac_setup(seed=0):
    args = _small_args()
    optimizer = optax.adam(args.learning_rate)
    k_sac, k_obs, k_next, k_z, k_r, k_noise = jax.random.split(jax.random.PRNGKey(seed), 6)
    params, opt_state = gorl_sac.init_sac(k_sac, OBS, LATENT, args, optimizer)
    # Move away from the prior so that the losses have non-trivial gradients.
    params["encoder"] = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(k_noise, p.shape), params["encoder"])
    batch = {
        "obs": jax.random.normal(k_obs, (B, OBS)),
        "latent": jax.random.normal(k_z, (B, LATENT)),
        "reward": jax.random.uniform(k_r, (B,)),
        "next_obs": jax.random.normal(k_next, (B, OBS)),
        "termination": jnp.array([0, 1, 0, 0, 1, 0, 0], jnp.float32),
    }
    return args, optimizer, params, opt_state, batch


def test_sac_loss_shapes_and_gradients():
    args, _, params, _, batch = _sac_setup()
    q = gorl_sac.critics(params["critic"], batch["obs"], batch["latent"])
    assert q.shape == (2, B)
    assert not np.allclose(q[0], q[1])  # two independently initialized critics
    key = jax.random.PRNGKey(3)
    critic_step = jax.jit(jax.value_and_grad(
        lambda c, e, t, b, k: gorl_sac.critic_loss(c, e, t, 1.0, b, k, args), has_aux=True))
    (loss, metrics), grads = critic_step(params["critic"], params["encoder"], params["target_critic"], batch, key)
    assert loss.shape == () and all(v.shape == () for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    actor_step = jax.jit(jax.value_and_grad(
        lambda e, c, o, k: gorl_sac.actor_loss(e, c, 0.2, o, k, args.kl_beta), has_aux=True))
    (loss, metrics), grads = actor_step(params["encoder"], params["critic"], batch["obs"], key)
    assert loss.shape == () and all(v.shape == () for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_critic_target_is_the_soft_bellman_backup():
    """y = r + gamma (1 - termination)(min_j Qbar_j(s', z') - alpha log pi(z'|s')), by hand."""
    args, _, params, _, batch = _sac_setup()
    key, alpha = jax.random.PRNGKey(4), 0.3
    z, log_prob, _, _ = gorl_sac.sample_latent(params["encoder"], batch["next_obs"], key)
    next_q = np.min(np.asarray(gorl_sac.critics(params["target_critic"], batch["next_obs"], z)), axis=0)
    y = np.asarray(batch["reward"]) + args.discount * (1 - np.asarray(batch["termination"])) * (
        next_q - alpha * np.asarray(log_prob))
    q = np.asarray(gorl_sac.critics(params["critic"], batch["obs"], batch["latent"]))
    expected = 0.5 * ((q - y) ** 2).mean(axis=1).sum()
    loss, metrics = gorl_sac.critic_loss(
        params["critic"], params["encoder"], params["target_critic"], alpha, batch, key, args)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sac/target"]), y.mean(), rtol=1e-5)


def test_temperature_rises_when_entropy_is_below_target():
    target_entropy = -3.0
    grad = jax.grad(gorl_sac.temperature_loss)
    # log pi = 5 > -target: entropy -5 is below the target -3, so descent must raise log alpha.
    assert float(grad(jnp.float32(0.0), 5.0, target_entropy)) < 0
    assert float(grad(jnp.float32(0.0), 1.0, target_entropy)) > 0


def test_target_update_is_the_stated_polyak_average():
    args, optimizer, params, opt_state, _ = _sac_setup()
    target = jax.tree.map(lambda p: p + 1.0, params["critic"])
    online = params["critic"]
    mixed = gorl_sac.polyak(target, online, 0.005)
    for m, t, o in zip(jax.tree.leaves(mixed), jax.tree.leaves(target), jax.tree.leaves(online)):
        np.testing.assert_allclose(m, 0.005 * np.asarray(o) + 0.995 * np.asarray(t), rtol=1e-6, atol=1e-7)
    # Inside one gradient step: the new target is tau * (updated critic) + (1 - tau) * old target.
    params["target_critic"] = target
    buffer = gorl_sac.replay_add(gorl_sac.replay_init(32, _sac_setup()[4]), _sac_setup()[4])
    update = jax.jit(gorl_sac.make_sac_update(optimizer, -float(LATENT), args))
    (new, _), metrics = update((params, opt_state), jax.random.PRNGKey(5), buffer, common.normalizer_init(OBS))
    assert all(v.shape == () for v in metrics.values())
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new["critic"]), jax.tree.leaves(online)))
    for n, t, o in zip(jax.tree.leaves(new["target_critic"]), jax.tree.leaves(target), jax.tree.leaves(new["critic"])):
        np.testing.assert_allclose(n, args.tau * np.asarray(o) + (1 - args.tau) * np.asarray(t), rtol=1e-5, atol=1e-6)


def test_latent_gaussian_stays_in_its_bounds():
    out = jnp.array([[-1e4, -1e4], [1e4, 1e4], [0.0, gorl_sac.prior_scale_bias()]])
    mean, scale = gorl_sac.latent_gaussian(out)
    np.testing.assert_allclose(mean[:, 0], [-gorl_sac.LATENT_MEAN_BOUND, gorl_sac.LATENT_MEAN_BOUND, 0.0])
    np.testing.assert_allclose(scale[:, 0], [gorl_sac.LATENT_SCALE_MIN, gorl_sac.LATENT_SCALE_MAX, 1.0], rtol=1e-5)
    # Smooth: the prior's point is inside both ranges, so gradients reach both heads there.
    grad = jax.grad(lambda o: jnp.sum(jnp.stack(gorl_sac.latent_gaussian(o))))(out[2])
    assert np.all(np.asarray(grad) > 0)


def test_reinitialized_encoder_outputs_the_prior():
    args = _small_args()
    params, _ = gorl_sac.init_sac(jax.random.PRNGKey(6), OBS, LATENT, args, optax.adam(1e-3))
    obs = 10.0 * jax.random.normal(jax.random.PRNGKey(7), (64, OBS))
    mean, scale = gorl_sac.encoder(params["encoder"], obs)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(scale, 1.0, rtol=1e-5)
    np.testing.assert_allclose(common.kl_to_standard_normal(mean, scale), 0.0, atol=1e-5)
    # A fresh learner: targets equal the critics, alpha at its initial value.
    for a, b in zip(jax.tree.leaves(params["critic"]), jax.tree.leaves(params["target_critic"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.exp(float(params["log_alpha"])), args.init_alpha, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Diffusion decoder
# ---------------------------------------------------------------------------------------------


def test_zero_initialized_decoder_is_exactly_the_identity():
    args = _small_args()
    params = gorl_sac.init_decoder(jax.random.PRNGKey(8), OBS, LATENT, args)
    obs = jax.random.normal(jax.random.PRNGKey(9), (256, OBS))
    z = 5.0 * jax.random.normal(jax.random.PRNGKey(10), (256, LATENT))
    sched = gorl_sac.diffusion_schedule(args.diffusion_steps, args.decoder_output, args.noise_schedule)
    a = jax.jit(gorl_sac.decode, static_argnums=4)(params, obs, z, sched, args.denoised_clip)
    np.testing.assert_array_equal(a, z)  # bit for bit, not just close


def test_ddim_sampler_is_textbook_ddim_with_the_skip_noise_prediction():
    """The folded step x + B_k f equals a_hat = (x - sqrt(1-ab_k) eps_hat) / sqrt(ab_k),
    x_{k-1} = sqrt(ab_{k-1}) a_hat + sqrt(1-ab_{k-1}) eps_hat, for a non-zero network."""
    args = _small_args()
    T = args.diffusion_steps
    params = common.mlp_init(jax.random.PRNGKey(11), [OBS + LATENT + 8, *args.decoder_hidden, LATENT])
    params[-1] = jax.tree.map(lambda p: 0.01 * p, params[-1])
    obs = jax.random.normal(jax.random.PRNGKey(12), (16, OBS))
    z = jax.random.normal(jax.random.PRNGKey(13), (16, LATENT))
    ab = common.cosine_alpha_bar(T)
    assert args.noise_schedule == "cosine" and args.decoder_output == "eps" and args.denoised_clip is None
    sched = gorl_sac.diffusion_schedule(T, args.decoder_output, args.noise_schedule)
    x = np.asarray(z, np.float64)
    for t in range(T, 0, -1):
        eps = np.asarray(gorl_sac.predict_noise(params, obs, jnp.asarray(x, jnp.float32), t, sched), np.float64)
        a_hat = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        x = np.sqrt(ab[t - 1]) * a_hat + np.sqrt(1 - ab[t - 1]) * eps
    a = gorl_sac.decode(params, obs, z, sched, None)
    assert np.abs(np.asarray(a) - z).max() > 1e-2  # the network does move the sample
    np.testing.assert_allclose(a, x, atol=5e-4 * (1 + np.abs(x).max()))
    # The schedule: alpha_bar decreasing from 1 to nearly 0; the skip close to sqrt(1 - alpha_bar).
    assert ab[0] == 1.0 and np.all(np.diff(ab) < 0) and ab[-1] < 1e-4


def test_refinement_fits_a_state_dependent_action_from_the_prior():
    """A few hundred denoising steps with prior noise: DDIM from fresh prior latents then lands
    near the data (here a = 2 * s_0 + 0.05 noise)."""
    args = _small_args()
    T = args.diffusion_steps
    sched = gorl_sac.diffusion_schedule(T, args.decoder_output, args.noise_schedule)
    params = gorl_sac.init_decoder(jax.random.PRNGKey(14), 1, 1, args)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train(params, key):
        def step(carry, key):
            params, opt_state = carry
            k_obs, k_a, k_noise, k_step = jax.random.split(key, 4)
            obs = jax.random.uniform(k_obs, (256, 1), minval=-1, maxval=1)
            actions = 2.0 * obs + 0.05 * jax.random.normal(k_a, obs.shape)
            xi = jax.random.normal(k_noise, actions.shape)
            t = jax.random.randint(k_step, (256,), 1, T + 1)
            loss, grads = jax.value_and_grad(gorl_sac.diffusion_loss)(params, obs, actions, xi, t, sched)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, 1500))
        return params, losses

    params, losses = train(params, jax.random.PRNGKey(15))
    assert losses[-100:].mean() < 0.5 * losses[:100].mean()
    obs = jnp.linspace(-1, 1, 9)[:, None].repeat(64, axis=0)
    a = gorl_sac.decode(params, obs, jax.random.normal(jax.random.PRNGKey(16), obs.shape), sched, None)
    assert np.abs(np.asarray(a) - 2.0 * np.asarray(obs)).mean() < 0.15


# ---------------------------------------------------------------------------------------------
# Flags, environments, smoke run
# ---------------------------------------------------------------------------------------------


def test_validation_rejects_bad_flags_before_compiling(capsys):
    with pytest.raises(SystemExit) as e:
        gorl_sac.make_env(gorl_sac.Args(env_name="NoSuchTask"))
    assert "Hopper" in str(e.value) and "CartpoleBalance" in str(e.value)
    with pytest.raises(SystemExit) as e:
        gorl_sac.validate(gorl_sac.Args(num_envs=3, utd_ratio=0.5))
    assert "utd-ratio" in str(e.value)
    with pytest.raises(SystemExit) as e:
        gorl_sac.validate(gorl_sac.Args(stage_steps=(4000, 1000)))
    assert "learning-starts" in str(e.value)
    with pytest.raises(SystemExit):
        gorl_sac.validate(gorl_sac.Args(impl="warp"))
    gorl_sac.validate(gorl_sac.Args())  # the paper's defaults are valid
    assert gorl_sac.updates_per_env_step(gorl_sac.Args()) == 20 * 16


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GORL_SLOW_TESTS"),
                    reason="compiles Brax's MJX Hopper (over a minute on a 2-core CPU); set GORL_SLOW_TESTS=1")
def test_brax_hopper_keeps_the_true_last_observation():
    env = common.make_env(gorl_sac.make_env(gorl_sac.Args(env_name="Hopper")), episode_length=50)
    assert (env.observation_size, env.action_size) == (11, 3)  # Hopper-v2's sizes (Table 5)

    @jax.jit
    def run(key):
        state = env.reset(jax.random.split(key, 2))

        def step(state, action):
            nxt = env.step(state, action)
            return nxt, {"next_obs": nxt.info["next_obs"], "obs": nxt.obs, "done": nxt.done,
                         "truncation": nxt.info["truncation"], "first_obs": nxt.info["first_obs"],
                         "sum_reward": nxt.info["episode_metrics"]["sum_reward"]}

        # Environment 0 does nothing and stands until the time limit; environment 1 applies full
        # torques and falls over (early termination) every few steps.
        actions = jnp.stack([jnp.zeros((60, 3)), jnp.tile(jnp.array([3.0, -3.0, 3.0]), (60, 1))], axis=1)
        return jax.lax.scan(step, state, actions)[1]

    out = jax.device_get(run(jax.random.PRNGKey(0)))
    done, trunc = out["done"], out["truncation"]
    # Time limit: done and truncated (bootstrap, not terminal), at step 50 exactly.
    assert done[:, 0].nonzero()[0].tolist() == [49] and trunc[49, 0] == 1
    # Early termination: done, not truncated (terminal: no bootstrap).
    falls = done[:, 1].nonzero()[0]
    assert len(falls) >= 2 and np.all(trunc[falls, 1] == 0)
    for t, i in [(49, 0), *[(f, 1) for f in falls]]:
        # Auto-reset put the first observation into obs; next_obs kept the true last one.
        np.testing.assert_array_equal(out["obs"][t, i], out["first_obs"][t, i])
        assert not np.allclose(out["next_obs"][t, i], out["obs"][t, i])
        assert out["sum_reward"][t, i] != 0
    steady = np.ones(60, bool)
    steady[falls] = False
    np.testing.assert_array_equal(out["next_obs"][steady, 1], out["obs"][steady, 1])
    # Fresh start states: the redraw replaces Brax's own auto-reset cache (`first_obs`,
    # `first_pipeline_state`), so the next episodes start elsewhere.
    state = jax.jit(env.reset)(jax.random.split(jax.random.PRNGKey(0), 2))
    fresh = jax.jit(lambda s, k: common.redraw_start_states(env, s, k))(state, jax.random.PRNGKey(5))
    for name in ("first_obs", "first_pipeline_state"):
        old_leaves, new_leaves = jax.tree.leaves(state.info[name]), jax.tree.leaves(fresh.info[name])
        assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(old_leaves, new_leaves))
    np.testing.assert_array_equal(fresh.obs, state.obs)  # the episodes in progress are untouched


SMOKE_FLAGS = [
    "--env-name", "CartpoleBalance", "--stage-steps", "400", "400", "--num-envs", "4", "--chunk-length", "25",
    "--utd-ratio", "0.5", "--batch-size", "32", "--buffer-size", "1000", "--learning-starts", "100",
    "--encoder-hidden", "32", "32", "--critic-hidden", "32", "32", "--refine-envs", "4",
    "--refine-iterations", "1", "--refine-epochs", "2", "--refine-batch-size", "1000",
    "--num-eval-envs", "4", "--eval-every", "200",
]


def _cli(flags, tmp_path):
    """`python gorl_sac.py FLAGS`; identical computations compile once across the two runs
    (XLA's persistent cache), so the resumed run costs little more than its imports."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    result = subprocess.run([sys.executable, "gorl_sac.py", *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_smoke_run_two_stages_and_resume(tmp_path):
    out = _cli([*SMOKE_FLAGS, "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert "| S0 | 400 |" in out and "| S1 | 800 |" in out
    (run_dir,) = [os.path.join(tmp_path, "runs", d) for d in os.listdir(tmp_path / "runs")]
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["algo"] == "gorl_sac"
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == [100, 200, 300, 400, 400, 500, 600, 700, 800]  # 400 twice: stage 0, refinement
    refine = rows[4]
    assert math.isfinite(float(refine["refine/loss_final"]))
    assert math.isfinite(float(refine["refine/prior_latent_return"]))
    assert math.isfinite(float(rows[-1]["eval/return"])) and math.isfinite(float(rows[-1]["loss/critic"]))
    # Warm-up: each stage's buffer starts empty and no gradient step is made before it holds
    # learning_starts = 100 transitions (the 25th step of 4 environments), then 2 per step.
    chunks = [r for r in rows if r["sac/gradient_steps"]]
    assert [float(r["sac/gradient_steps"]) for r in chunks] == [2, 50, 50, 50] * 2
    assert [int(float(r["buffer/size"])) for r in chunks] == [100, 200, 300, 400] * 2
    for stage in (0, 1):
        saved = running.load_checkpoint(os.path.join(run_dir, "checkpoints", f"stage{stage}.npz"))
        assert int(saved["step"]) == 400 * (stage + 1)
    # The stage table carries the refined decoder's return that the refinement row logged.
    assert saved["stage_rows"][0]["refined_prior_return"] == pytest.approx(float(refine["refine/prior_latent_return"]))
    assert os.path.exists(os.path.join(run_dir, "stages.md"))
    # Stage 0 ran with the identity decoder; stage 1 with the refined one.
    assert np.all(running.load_checkpoint(os.path.join(run_dir, "checkpoints", "stage0.npz"))["decoder"][-1]["w"] == 0)
    assert np.any(saved["decoder"][-1]["w"] != 0)

    # Resume after stage 0, as if interrupted in stage 1: the refinement and stage 1 run again.
    os.remove(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    out = _cli(["--resume", run_dir], tmp_path)
    assert "resuming after stage 0 at step 400" in out and "| S1 | 800 |" in out
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == steps
    again = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    # Same key, same stage-0 checkpoint: the same refined decoder.
    for a, b in zip(jax.tree.leaves(again["decoder"]), jax.tree.leaves(saved["decoder"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
