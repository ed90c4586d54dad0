"""Tests of fpo.py: the FPO ratio, the Euler sampler, loss shapes, and a smoke run."""

import csv
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import running
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


def _cfm(params, batch, args):
    return fpo.cfm_losses(params, batch["obs"], batch["action"], batch["cfm_t"], batch["cfm_eps"], args)


def test_cfm_losses_match_hand_computation():
    args, params, batch = _setup()
    losses = _cfm(params["actor"], batch, args)
    assert losses.shape == (B, N)
    i, j = 2, 5
    t, eps, a = batch["cfm_t"][i, j], batch["cfm_eps"][i, j], batch["action"][i]
    x_t = (1 - t) * eps + t * a
    net = common.mlp_apply(params["actor"], jnp.concatenate([batch["obs"][i], x_t, common.time_embedding(t)]))
    v = 0.25 * np.asarray(net)  # the released output scale
    # The released "u_but_supervise_as_eps": the error of the noise the velocity implies, a mean over dims.
    np.testing.assert_allclose(losses[i, j], np.mean((eps - (x_t - t * v)) ** 2), rtol=1e-5)
    # ... which is the plain CFM loss weighted by t^2.
    plain = _cfm(params["actor"], batch, dataclasses.replace(args, cfm_target="velocity"))
    np.testing.assert_allclose(plain[i, j], np.mean((v - (a - eps)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(losses, batch["cfm_t"] ** 2 * plain, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(batch["cfm_loss"], losses, rtol=1e-5)


@pytest.mark.parametrize("cfm_target", ["eps", "velocity"])
def test_cfm_loss_is_a_mean_over_action_dimensions(cfm_target):
    """An A-dimensional action whose every dimension has the 1-D action's error gives the 1-D
    loss (a sum would give A times it and narrow the trust region A times)."""
    args = dataclasses.replace(fpo.Args(), cfm_target=cfm_target)
    k_params, k_obs = jax.random.split(jax.random.PRNGKey(7))
    obs = jax.random.normal(k_obs, (OBS,))
    t, e, a = jnp.array([0.3, 0.8]), jnp.array([[0.7], [-1.2]]), jnp.array([0.4])
    params_1d = fpo.init_params(k_params, OBS, 1, args)["actor"]
    params_1d[-1] = {"w": jnp.zeros_like(params_1d[-1]["w"]), "b": jnp.array([0.8])}  # v = 0.2
    one = fpo.cfm_losses(params_1d, obs, a, t, e, args)
    for dims in (4, 17):
        params = fpo.init_params(k_params, OBS, dims, args)["actor"]
        params[-1] = {"w": jnp.zeros_like(params[-1]["w"]), "b": jnp.full(dims, 0.8)}
        many = fpo.cfm_losses(params, obs, jnp.tile(a, dims), t, jnp.tile(e, (1, dims)), args)
        np.testing.assert_allclose(many, one, rtol=1e-6)
    assert float(one[0]) > 0.0


def test_ratio_is_exactly_one_for_equal_parameters():
    args, params, batch = _setup()
    batch = {**batch}
    batch["cfm_loss"] = _cfm(params["actor"], batch, args)
    log_ratio, _ = fpo.fpo_log_ratio(params["actor"], batch, args)
    assert log_ratio.shape == (B,)
    assert np.all(np.exp(np.asarray(log_ratio)) == 1.0)
    # Under jit, as in training, and against the losses the rollout policy stored.
    log_ratio, _ = jax.jit(lambda p, b: fpo.fpo_log_ratio(p, b, args))(params["actor"], _setup()[2])
    np.testing.assert_allclose(np.exp(log_ratio), 1.0, atol=1e-5)


def test_ratio_moves_with_the_cfm_loss():
    args, params, batch = _setup()
    actor = params["actor"]

    @jax.jit
    def cfm(p, sample):
        return _cfm(p, sample, args).mean()

    log_ratio = jax.jit(lambda p, b: fpo.fpo_log_ratio(p, b, args))
    for i in range(B):
        sample = jax.tree.map(lambda x: x[i:i + 1], batch)
        grad = jax.grad(cfm)(actor, sample)
        lower = jax.tree.map(lambda p, g: p - 1e-3 * g, actor, grad)
        higher = jax.tree.map(lambda p, g: p + 1e-3 * g, actor, grad)
        assert cfm(lower, sample) < cfm(actor, sample) < cfm(higher, sample)
        up, _ = log_ratio(lower, sample)
        down, _ = log_ratio(higher, sample)
        assert float(up[0]) > 0.0 and float(down[0]) < 0.0
        # The ratio is that of the pair-averaged losses, not an average of per-pair ratios.
        expected = float(sample["cfm_loss"].mean() - cfm(lower, sample))
        np.testing.assert_allclose(float(up[0]), expected, rtol=1e-3, atol=1e-6)


def test_log_ratio_is_clipped_before_exp():
    args, params, batch = _setup()
    wild = jax.tree.map(lambda p: 100.0 * p, params["actor"])
    log_ratio, _ = fpo.fpo_log_ratio(wild, batch, dataclasses.replace(args, max_log_ratio=2.0))
    assert np.all(np.abs(np.asarray(log_ratio)) <= 2.0)
    assert np.any(np.abs(np.asarray(log_ratio)) == 2.0)


def test_euler_sampler_integrates_from_0_to_1():
    args, params, batch = _setup()
    actor = jax.tree.map(lambda x: x, params["actor"])
    # A constant velocity c carries x_0 to x_0 + c: the 10 steps must span t in [0, 1].
    c = jnp.array([0.5, -1.0, 2.0])
    actor[-1] = {"w": jnp.zeros_like(actor[-1]["w"]), "b": c / args.velocity_scale}
    x_0 = jax.random.normal(jax.random.PRNGKey(3), (B, ACT))
    x_1 = fpo.sample_action(actor, batch["obs"], x_0, args)
    np.testing.assert_allclose(x_1, x_0 + c, atol=1e-5)


def test_initial_policy_spreads_like_the_prior():
    """With the released 0.25 output scale, the untrained flow moves its noise little: the
    actions spread about like N(0, 1) (PPO's initial Gaussian), not a saturated tanh."""
    args, params, _ = _setup()
    obs = jnp.zeros((10_000, OBS))
    x_0 = jax.random.normal(jax.random.PRNGKey(5), (10_000, ACT))
    a = fpo.sample_action(params["actor"], obs, x_0, args)
    assert 0.7 < float(jnp.std(a)) < 1.3
    assert float(jnp.mean(jnp.abs(jnp.tanh(a)) > 0.95)) < 0.2


def test_evaluation_policies():
    """The released evaluation samples x_0 (different keys, different actions); the deterministic
    one is the flow from x_0 = 0, whatever the key."""
    args, params, batch = _setup()
    norm = common.normalizer_init(OBS)
    a = fpo.act_sampled(params, norm, batch["obs"], jax.random.PRNGKey(1), ACT, args)
    b = fpo.act_sampled(params, norm, batch["obs"], jax.random.PRNGKey(2), ACT, args)
    assert float(jnp.max(jnp.abs(a - b))) > 0.1
    x_0 = jax.random.normal(jax.random.PRNGKey(1), (B, ACT))
    np.testing.assert_allclose(a, fpo.sample_action(params["actor"], batch["obs"], x_0, args), atol=1e-6)
    d = fpo.act(params, norm, batch["obs"], ACT, args)
    np.testing.assert_allclose(d, fpo.sample_action(params["actor"], batch["obs"], jnp.zeros((B, ACT)), args), atol=1e-6)


def test_loss_shapes_and_gradients():
    args, params, batch = _setup()
    batch = {**batch, "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: fpo.fpo_loss(p, b, args), has_aux=True))
    (loss, metrics), grads = loss_and_grad(params, batch)
    assert loss.shape == ()
    assert all(v.shape == () for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert abs(float(metrics["policy/log_ratio"])) < 1e-5
    # At ratio 1 nothing is clipped and the approximate KL is 0.
    assert float(metrics["policy/clip_fraction"]) == 0.0
    assert abs(float(metrics["policy/approx_kl"])) < 1e-6
    # The policy gradient of the unclipped surrogate is -mean(A_norm * grad log r): nonzero.
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["actor"]))


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
    # CartpoleBalance pays at most 1 per step: a full 1000-step episode returns at most 1000.
    assert 0 < float(rows[-1]["eval/return"]) <= 1000 and float(rows[-1]["eval/episode_length"]) == 1000
    # The logged losses add up as the loss does (means over the minibatches are linear).
    for r in rows:
        assert float(r["loss/total"]) == pytest.approx(
            float(r["loss/policy"]) + args.vf_coef * float(r["loss/value"]), rel=1e-4, abs=1e-5)
    assert int(running.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))["step"]) == 640


def _loss_batch(args, params, batch):
    return {**batch, "advantage": jnp.arange(B, dtype=jnp.float32), "target": jnp.ones(B)}


# The newest release's configs/methods/fpo.toml ([ppo], [decoder]); the discount per task.
RELEASED_DEFAULTS = {
    "learning_rate": 3e-4, "clip_eps": 0.05, "discount": 0.995, "gae_lambda": 0.95, "vf_coef": 0.25,
    "reward_scaling": 10.0, "num_envs": 2048, "batch_size": 1024, "num_minibatches": 32, "unroll_length": 30,
    "num_epochs": 16, "total_timesteps": 180_000_000, "num_eval_envs": 128, "num_flow_steps": 10, "num_cfm_samples": 8,
    "velocity_scale": 0.25, "cfm_target": "eps", "deterministic_eval": False,
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
