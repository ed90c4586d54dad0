"""Tests of dppo.py: the cosine schedule, the chain log-likelihood, loss shapes, and a smoke run."""

import csv
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import common
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


def _hand_schedule(K, s=0.008):
    """Cosine schedule written out step by step, alpha_bar indexed 0..K."""
    f = [math.cos((k / K + s) / (1 + s) * math.pi / 2) ** 2 for k in range(K + 1)]
    alpha_bar = [1.0]
    betas = [None]
    for k in range(1, K + 1):
        beta = min(1.0 - f[k] / f[k - 1], 0.999)
        betas.append(beta)
        alpha_bar.append(alpha_bar[-1] * (1.0 - beta))
    return betas, alpha_bar


def test_cosine_schedule():
    K = 10
    sched = dppo.cosine_schedule(K)
    betas, alpha_bar = _hand_schedule(K)
    np.testing.assert_allclose(sched["beta"], betas[1:], rtol=1e-12)
    np.testing.assert_allclose(sched["alpha_bar"], alpha_bar[1:], rtol=1e-12)
    np.testing.assert_allclose(sched["alpha_bar_prev"], alpha_bar[:-1], rtol=1e-12)
    assert np.all(np.diff(sched["alpha_bar"]) < 0) and sched["beta"][-1] == 0.999


def test_chain_log_likelihood_is_sum_of_per_step_gaussians_by_hand():
    args, params, obs, action, extras = _setup()
    K, sigma, clip = args.num_denoising_steps, args.denoising_std, args.denoised_clip
    betas, alpha_bar = _hand_schedule(K)
    predict_noise = jax.jit(dppo.predict_noise, static_argnums=4)
    # A sampled chain (likely steps) and a perturbed one (unlikely steps): both must match.
    perturbed = extras["chain"] + 0.1 * jax.random.normal(jax.random.PRNGKey(7), extras["chain"].shape)
    for chain in (extras["chain"], perturbed):
        got = dppo.chain_log_prob(params["actor"], obs, chain, args)
        assert got.shape == (B,)
        chain = np.asarray(chain, np.float64)
        for b in range(B):
            total = 0.0
            for j in range(K):
                k = K - j
                x_k, x_prev = chain[b, j], chain[b, j + 1]
                eps = np.asarray(predict_noise(params["actor"], obs[b], jnp.asarray(x_k, jnp.float32), k, K))
                x0 = np.clip((x_k - math.sqrt(1 - alpha_bar[k]) * eps) / math.sqrt(alpha_bar[k]), -clip, clip)
                mu = (math.sqrt(alpha_bar[k - 1]) * betas[k] / (1 - alpha_bar[k]) * x0
                      + math.sqrt(1 - betas[k]) * (1 - alpha_bar[k - 1]) / (1 - alpha_bar[k]) * x_k)
                total += stats.norm.logpdf(x_prev, mu, sigma).sum()
            np.testing.assert_allclose(float(got[b]), total, rtol=2e-4, atol=1e-2)


def test_rollout_records_the_chain_and_its_log_likelihood():
    args, params, obs, action, extras = _setup()
    chain = extras["chain"]
    assert chain.shape == (B, args.num_denoising_steps + 1, ACT)
    np.testing.assert_array_equal(action, chain[:, -1])
    # Same parameters: the ratio against the stored log-likelihood is 1.
    np.testing.assert_allclose(
        dppo.chain_log_prob(params["actor"], obs, chain, args), extras["log_prob"], rtol=1e-5, atol=1e-3
    )


def test_deterministic_denoising_without_noise():
    args, params, obs, _, _ = _setup()
    x_K = jnp.zeros((B, ACT))
    chain, _ = dppo.denoise(params["actor"], obs, x_K, jnp.zeros((args.num_denoising_steps, B, ACT)), args)
    x = x_K
    mean = jax.jit(lambda p, o, x, k: dppo.denoising_mean(p, o, x, k, args))
    for k in range(args.num_denoising_steps, 0, -1):
        x = mean(params["actor"], obs, x, k)
    np.testing.assert_allclose(chain[:, -1], x, atol=1e-5)


def test_loss_shapes_and_gradients():
    args, params, obs, action, extras = _setup()
    batch = {"obs": obs, "chain": extras["chain"], "log_prob": extras["log_prob"],
             "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: dppo.dppo_loss(p, b, args), has_aux=True))
    (loss, metrics), grads = loss_and_grad(params, batch)
    assert loss.shape == ()
    assert all(v.shape == () for v in metrics.values())
    assert abs(float(metrics["policy/log_ratio"])) < 1e-3
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
    assert math.isfinite(float(rows[-1]["eval/return"]))
    assert math.isfinite(float(rows[-1]["loss/total"]))
    assert int(common.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))["step"]) == 640


def _loss_batch(args, params, obs, action, extras):
    return {"obs": obs, "chain": extras["chain"], "log_prob": extras["log_prob"],
            "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}


# The newest release's configs/methods/dppo.toml ([ppo], [decoder]); the discount per task.
RELEASED_DEFAULTS = {
    "learning_rate": 3e-4, "clip_eps": 0.2, "discount": 0.995, "gae_lambda": 0.95, "vf_coef": 0.25,
    "reward_scaling": 10.0, "num_envs": 2048, "batch_size": 1024, "num_minibatches": 32, "unroll_length": 30,
    "num_epochs": 16, "total_timesteps": 180_000_000, "num_eval_envs": 128, "num_denoising_steps": 10, "denoising_std": 0.05,
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
