"""Tests of dppo.py: the Euler SDE chain and its per-step likelihoods, the per-step clip, loss shapes, and a smoke run."""

import csv
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import common
import running
import dppo

OBS, ACT, B = 5, 3, 4


@functools.lru_cache
def _setup(seed=0):
    args = dppo.Args()
    k_params, k_obs, k_policy = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = dppo.init_params(k_params, OBS, ACT, args)
    obs = jax.random.normal(k_obs, (B, OBS))
    policy = dppo.make_policy(params["actor"], common.normalizer_init(OBS), args)
    action, extras = jax.jit(policy)(obs, k_policy)
    return args, params, obs, action, extras


def _hand_velocity(params, obs, x, t):
    net = common.mlp_apply(params, jnp.concatenate([obs, jnp.asarray(x, jnp.float32), common.time_embedding(jnp.float32(t))]))
    return 0.25 * np.asarray(net, np.float64)


def test_step_log_likelihoods_are_euler_sde_gaussians_by_hand():
    """Step k: x_{k+1} ~ N(x_k + dt v(x_k, t_k, s), sigma^2 I), t_k = 1 - k/K, dt = -1/K."""
    args, params, obs, action, extras = _setup()
    K, sigma = args.num_denoising_steps, args.denoising_std
    # A sampled chain (likely steps) and a perturbed one (unlikely steps): both must match.
    perturbed = extras["chain"] + 0.1 * jax.random.normal(jax.random.PRNGKey(7), extras["chain"].shape)
    for chain in (extras["chain"], perturbed):
        got = dppo.step_log_probs(params["actor"], obs, chain, args)
        assert got.shape == (B, K)
        chain = np.asarray(chain, np.float64)
        for b in range(B):
            for k in range(K):
                x, x_next = chain[b, k], chain[b, k + 1]
                mean = x - 1.0 / K * _hand_velocity(params["actor"], obs[b], x, 1.0 - k / K)
                expected = stats.norm.logpdf(x_next, mean, sigma).sum()
                np.testing.assert_allclose(float(got[b, k]), expected, rtol=1e-4, atol=2e-3)


def test_rollout_records_the_chain_and_its_per_step_log_likelihoods():
    args, params, obs, action, extras = _setup()
    chain = extras["chain"]
    assert chain.shape == (B, args.num_denoising_steps + 1, ACT)
    assert extras["log_prob"].shape == (B, args.num_denoising_steps)
    np.testing.assert_array_equal(action, chain[:, -1])
    # Same parameters: every step's ratio against the stored log-likelihood is 1.
    np.testing.assert_allclose(
        dppo.step_log_probs(params["actor"], obs, chain, args), extras["log_prob"], rtol=1e-5, atol=1e-3
    )


def test_deterministic_denoising_without_noise():
    """No noise: the chain of means from x = 0 at t = 1, Euler steps with dt = -1/K."""
    args, params, obs, _, _ = _setup()
    K = args.num_denoising_steps
    chain, _ = dppo.denoise(params["actor"], obs, jnp.zeros((B, ACT)), jnp.zeros((K, B, ACT)), args)
    for b in range(B):
        x = np.zeros(ACT)
        for k in range(K):
            x = x - 1.0 / K * _hand_velocity(params["actor"], obs[b], x, 1.0 - k / K)
        np.testing.assert_allclose(chain[b, -1], x, atol=1e-5)
    np.testing.assert_allclose(dppo.act(params, common.normalizer_init(OBS), obs, ACT, args), chain[:, -1], atol=1e-6)


def test_initial_policy_is_not_saturated():
    """At init the actions spread about like N(0, 1) before tanh (PPO's initial Gaussian): under
    20% of 10,000 sampled actions at a fixed state have |tanh a| > 0.95 (the DDPM form this
    replaced had 97%)."""
    args = dppo.Args()
    obs_size, action_size = 17, 6
    params = dppo.init_params(jax.random.PRNGKey(3), obs_size, action_size, args)
    obs = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(4), (obs_size,)), (10_000, obs_size))
    chain, _ = dppo.sample(params["actor"], obs, jax.random.PRNGKey(5), args)
    a = chain[:, -1]
    saturated = float(jnp.mean(jnp.abs(jnp.tanh(a)) > 0.95))
    assert saturated < 0.2, saturated
    assert 0.8 < float(jnp.std(a)) < 1.3
    # Every step, the last included, adds noise of standard deviation sigma around its mean.
    ts, dt = dppo.time_grid(args.num_denoising_steps)
    x = chain[:, :-1]
    t = jnp.broadcast_to(ts, x.shape[:-1])
    obs_k = jnp.broadcast_to(obs[:, None], (*x.shape[:-1], obs_size))
    noise = chain[:, 1:] - (x + dt * dppo.velocity(params["actor"], obs_k, x, t, args.velocity_scale))
    np.testing.assert_allclose(jnp.std(noise, axis=(0, 2)), args.denoising_std, rtol=0.03)


def test_each_step_ratio_is_clipped_separately():
    """One step's ratio far outside the band with a positive advantage adds no gradient through
    that step, while the others still move: the surrogate is the mean of K clipped terms."""
    args, params, obs, action, extras = _setup()
    K = args.num_denoising_steps
    batch = {"obs": obs, "chain": extras["chain"], "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}
    # Old log-likelihoods lowered by 1 at step 0 only: r_0 = e, outside [0.8, 1.2].
    old = extras["log_prob"].at[:, 0].add(-1.0)
    loss, metrics = dppo.dppo_loss(params, {**batch, "log_prob": old}, args)
    a = np.asarray(batch["advantage"])
    a = (a - a.mean()) / (a.std() + 1e-8)
    ratio = np.ones((B, K))
    ratio[:, 0] = np.e
    clipped = np.clip(ratio, 1 - args.clip_eps, 1 + args.clip_eps)
    expected = -np.mean(np.minimum(ratio * a[:, None], clipped * a[:, None]))
    np.testing.assert_allclose(float(metrics["loss/policy"]), expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(float(metrics["policy/clip_fraction"]), 1.0 / K, rtol=1e-6)


def test_evaluation_policies():
    """The released evaluation samples (start and step noise); the deterministic one does not
    depend on the key."""
    args, params, obs, _, _ = _setup()
    norm = common.normalizer_init(OBS)
    a = dppo.act_sampled(params, norm, obs, jax.random.PRNGKey(1), args)
    b = dppo.act_sampled(params, norm, obs, jax.random.PRNGKey(2), args)
    assert float(jnp.max(jnp.abs(a - b))) > 0.1
    np.testing.assert_allclose(a, dppo.sample(params["actor"], obs, jax.random.PRNGKey(1), args)[0][:, -1], atol=1e-6)


def test_loss_shapes_and_gradients():
    args, params, obs, action, extras = _setup()
    batch = {"obs": obs, "chain": extras["chain"], "log_prob": extras["log_prob"],
             "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: dppo.dppo_loss(p, b, args), has_aux=True))
    (loss, metrics), grads = loss_and_grad(params, batch)
    assert loss.shape == ()
    assert all(v.shape == () for v in metrics.values())
    assert abs(float(metrics["policy/log_ratio"])) < 1e-3
    # At ratio 1 (same parameters) nothing is clipped and the approximate KL is 0.
    assert float(metrics["policy/clip_fraction"]) == 0.0
    assert abs(float(metrics["policy/approx_kl"])) < 1e-4
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["actor"]))


@pytest.mark.slow
def test_smoke_run(tmp_path):
    args = dppo.Args(
        env_name="CartpoleBalance", num_envs=16, batch_size=16, num_minibatches=2, unroll_length=10,
        num_epochs=2, total_timesteps=640, num_eval_envs=4, runs_dir=str(tmp_path),
    )
    dppo.main(args)
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["algo"] == "dppo"
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [320, 640]
    # CartpoleBalance pays at most 1 per step: a full 1000-step episode returns at most 1000.
    assert 0 < float(rows[-1]["eval/return"]) <= 1000 and float(rows[-1]["eval/episode_length"]) == 1000
    # The logged losses add up as the loss does (means over the minibatches are linear).
    for r in rows:
        assert float(r["loss/total"]) == pytest.approx(
            float(r["loss/policy"]) + args.vf_coef * float(r["loss/value"]), rel=1e-4, abs=1e-5)
    assert int(running.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))["step"]) == 640


def _loss_batch(args, params, obs, action, extras):
    return {"obs": obs, "chain": extras["chain"], "log_prob": extras["log_prob"],
            "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}


# The newest release's configs/methods/dppo.toml ([ppo], [decoder]); the discount per task.
RELEASED_DEFAULTS = {
    "learning_rate": 3e-4, "clip_eps": 0.2, "discount": 0.995, "gae_lambda": 0.95, "vf_coef": 0.25,
    "reward_scaling": 10.0, "num_envs": 2048, "batch_size": 1024, "num_minibatches": 32, "unroll_length": 30,
    "num_epochs": 16, "total_timesteps": 180_000_000, "num_eval_envs": 128, "num_denoising_steps": 10, "denoising_std": 0.05,
    "velocity_scale": 0.25, "deterministic_eval": False,
}


def test_defaults_are_the_released_values():
    resolved = dppo.resolve(dppo.Args())
    assert {k: getattr(resolved, k) for k in RELEASED_DEFAULTS} == RELEASED_DEFAULTS
    assert dppo.Args().discount is None  # the task's value
    assert dppo.resolve(dppo.Args(env_name="FingerSpin")).discount == 0.95
    assert dppo.resolve(dppo.Args(env_name="BallInCup")).discount == 0.95
    assert dppo.resolve(dppo.Args(env_name="FingerSpin", discount=0.99)).discount == 0.99


def test_value_loss_is_vf_coef_times_the_mean_squared_error():
    args, params, *rest = _setup()
    batch = _loss_batch(args, params, *rest)
    values = dppo.critic(params["critic"], batch["obs"])
    batch["target"] = values - jnp.where(jnp.arange(B) % 2 == 0, 2.0, 0.0)  # squared errors 4, 0, 4, ...
    loss, metrics = dppo.dppo_loss(params, batch, args)
    loss_without_value, _ = dppo.dppo_loss(params, batch, dataclasses.replace(args, vf_coef=0.0))
    mse = float(jnp.mean((values - batch["target"]) ** 2))
    assert mse == pytest.approx(2.0, rel=1e-5)
    assert float(metrics["loss/value"]) == pytest.approx(mse, rel=1e-5)
    assert float(loss - loss_without_value) == pytest.approx(args.vf_coef * mse, rel=1e-4)
