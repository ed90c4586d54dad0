"""Tests of fpo.py: the FPO ratio, the Euler sampler, loss shapes, and a smoke run."""

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

import common
import fpo

OBS, ACT, B, N = 5, 3, 6, 8


@functools.lru_cache
def _setup(seed=0):
    args = fpo.Args()
    k_params, k_obs, k_policy = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = fpo.init_params(k_params, OBS, ACT, args)
    obs = jax.random.normal(k_obs, (B, OBS))
    # The rollout policy stores the (t, eps) pairs and the old CFM losses; the identity
    # normalizer makes the stored losses comparable to the ones below.
    policy = fpo.make_policy(params["actor"], common.normalizer_init(OBS), args)
    action, extras = jax.jit(policy)(obs, k_policy)
    return args, params, {"obs": obs, "action": action, **extras}


def test_cfm_losses_match_hand_computation():
    args, params, batch = _setup()
    losses = fpo.cfm_losses(params["actor"], batch["obs"], batch["action"], batch["cfm_t"], batch["cfm_eps"])
    assert losses.shape == (B, N)
    i, j = 2, 5
    t, eps, a = batch["cfm_t"][i, j], batch["cfm_eps"][i, j], batch["action"][i]
    x_t = (1 - t) * eps + t * a
    v = fpo.velocity(params["actor"], batch["obs"][i], x_t, t)
    np.testing.assert_allclose(losses[i, j], np.sum((np.asarray(v) - (a - eps)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(batch["cfm_loss"], losses, rtol=1e-5)


def test_ratio_is_exactly_one_for_equal_parameters():
    args, params, batch = _setup()
    batch = {**batch}
    batch["cfm_loss"] = fpo.cfm_losses(
        params["actor"], batch["obs"], batch["action"], batch["cfm_t"], batch["cfm_eps"]
    )
    log_ratio, _ = fpo.fpo_log_ratio(params["actor"], batch, args.max_log_ratio)
    assert log_ratio.shape == (B,)
    assert np.all(np.exp(np.asarray(log_ratio)) == 1.0)
    # Under jit, as in training, and against the losses the rollout policy stored.
    log_ratio, _ = jax.jit(fpo.fpo_log_ratio, static_argnums=2)(params["actor"], _setup()[2], args.max_log_ratio)
    np.testing.assert_allclose(np.exp(log_ratio), 1.0, atol=1e-5)


def test_ratio_moves_with_the_cfm_loss():
    args, params, batch = _setup()
    actor = params["actor"]

    @jax.jit
    def cfm(p, sample):
        return fpo.cfm_losses(p, sample["obs"], sample["action"], sample["cfm_t"], sample["cfm_eps"]).mean()

    log_ratio = jax.jit(fpo.fpo_log_ratio, static_argnums=2)
    for i in range(B):
        sample = jax.tree.map(lambda x: x[i:i + 1], batch)
        grad = jax.grad(cfm)(actor, sample)
        lower = jax.tree.map(lambda p, g: p - 1e-3 * g, actor, grad)
        higher = jax.tree.map(lambda p, g: p + 1e-3 * g, actor, grad)
        assert cfm(lower, sample) < cfm(actor, sample) < cfm(higher, sample)
        up, _ = log_ratio(lower, sample, args.max_log_ratio)
        down, _ = log_ratio(higher, sample, args.max_log_ratio)
        assert float(up[0]) > 0.0 and float(down[0]) < 0.0
        # The ratio is that of the pair-averaged losses, not an average of per-pair ratios.
        expected = float(sample["cfm_loss"].mean() - cfm(lower, sample))
        np.testing.assert_allclose(float(up[0]), expected, rtol=1e-3, atol=1e-6)


def test_log_ratio_is_clipped_before_exp():
    args, params, batch = _setup()
    wild = jax.tree.map(lambda p: 100.0 * p, params["actor"])
    log_ratio, _ = fpo.fpo_log_ratio(wild, batch, 2.0)
    assert np.all(np.abs(np.asarray(log_ratio)) <= 2.0)
    assert np.any(np.abs(np.asarray(log_ratio)) == 2.0)


def test_euler_sampler_integrates_from_0_to_1():
    args, params, batch = _setup()
    actor = jax.tree.map(lambda x: x, params["actor"])
    # A constant velocity c carries x_0 to x_0 + c: the 10 steps must span t in [0, 1].
    c = jnp.array([0.5, -1.0, 2.0])
    actor[-1] = {"w": jnp.zeros_like(actor[-1]["w"]), "b": c}
    x_0 = jax.random.normal(jax.random.PRNGKey(3), (B, ACT))
    x_1 = fpo.sample_action(actor, batch["obs"], x_0, args.num_flow_steps)
    np.testing.assert_allclose(x_1, x_0 + c, atol=1e-5)


def test_loss_shapes_and_gradients():
    args, params, batch = _setup()
    batch = {**batch, "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: fpo.fpo_loss(p, b, args), has_aux=True))
    (loss, metrics), grads = loss_and_grad(params, batch)
    assert loss.shape == ()
    assert all(v.shape == () for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert abs(float(metrics["policy/log_ratio"])) < 1e-5


@pytest.mark.slow
def test_smoke_run(tmp_path):
    args = fpo.Args(
        env_name="CartpoleBalance", num_envs=16, batch_size=16, num_minibatches=2, unroll_length=10,
        num_epochs=2, total_timesteps=640, num_eval_envs=4, runs_dir=str(tmp_path),
    )
    fpo.main(args)
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["algo"] == "fpo"
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [320, 640]
    assert math.isfinite(float(rows[-1]["eval/return"]))
    assert math.isfinite(float(rows[-1]["loss/total"]))
    assert int(common.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))["step"]) == 640


def _loss_batch(args, params, batch):
    return {**batch, "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}


# The newest release's configs/methods/fpo.toml ([ppo], [decoder]); the discount per task.
RELEASED_DEFAULTS = {
    "learning_rate": 3e-4, "clip_eps": 0.05, "discount": 0.995, "gae_lambda": 0.95, "vf_coef": 0.25,
    "reward_scaling": 10.0, "num_envs": 2048, "batch_size": 1024, "num_minibatches": 32, "unroll_length": 30,
    "num_epochs": 16, "total_timesteps": 180_000_000, "num_eval_envs": 128, "num_flow_steps": 10, "num_cfm_samples": 8,
}


def test_defaults_are_the_released_values():
    resolved = fpo.resolve(fpo.Args())
    assert {k: getattr(resolved, k) for k in RELEASED_DEFAULTS} == RELEASED_DEFAULTS
    assert fpo.Args().discount is None  # the task's value
    assert fpo.resolve(fpo.Args(env_name="FingerSpin")).discount == 0.95
    assert fpo.resolve(fpo.Args(env_name="BallInCup")).discount == 0.95
    assert fpo.resolve(fpo.Args(env_name="FingerSpin", discount=0.99)).discount == 0.99


def test_value_loss_is_vf_coef_times_the_mean_squared_error():
    args, params, *rest = _setup()
    batch = _loss_batch(args, params, *rest)
    values = fpo.critic(params["critic"], batch["obs"])
    batch["target"] = values - jnp.where(jnp.arange(B) % 2 == 0, 2.0, 0.0)  # squared errors 4, 0, 4, ...
    loss, metrics = fpo.fpo_loss(params, batch, args)
    loss_without_value, _ = fpo.fpo_loss(params, batch, dataclasses.replace(args, vf_coef=0.0))
    mse = float(jnp.mean((values - batch["target"]) ** 2))
    assert mse == pytest.approx(2.0, rel=1e-5)
    assert float(metrics["loss/value"]) == pytest.approx(mse, rel=1e-5)
    assert float(loss - loss_without_value) == pytest.approx(args.vf_coef * mse, rel=1e-4)
