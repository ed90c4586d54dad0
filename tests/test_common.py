"""Tests of common.py: the math against plain references, the environment wrappers against the
bare MuJoCo Playground task, the decoder fit. (The running of a run: test_running.py.)"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from brax.envs.wrappers import training as brax_wrappers
from mujoco_playground import registry
from scipy import stats

import common
import running

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def gae_reference(rewards, values, next_values, terminations, episode_dones, discount, lam):
    """Plain loop: bootstrap unless terminated; restart the lambda-recursion at any episode end."""
    T, N = rewards.shape
    advantages = np.zeros((T, N))
    for n in range(N):
        following = 0.0  # advantage of the next row, if it belongs to the same episode
        for t in reversed(range(T)):
            bootstrap = 0.0 if terminations[t, n] else next_values[t, n]
            delta = rewards[t, n] + discount * bootstrap - values[t, n]
            if episode_dones[t, n]:
                following = 0.0
            advantages[t, n] = delta + discount * lam * following
            following = advantages[t, n]
    return advantages


def random_trajectories(rng, T=40, N=5):
    terminations = (rng.random((T, N)) < 0.08).astype(np.float32)
    truncations = ((rng.random((T, N)) < 0.08) & (terminations == 0)).astype(np.float32)
    assert terminations.sum() > 0 and truncations.sum() > 0
    return {
        "reward": rng.normal(size=(T, N)).astype(np.float32),
        "values": rng.normal(size=(T, N)).astype(np.float32),
        "next_values": rng.normal(size=(T, N)).astype(np.float32),
        "termination": terminations,
        "truncation": truncations,
        "episode_done": np.maximum(terminations, truncations),
    }


def test_gae_matches_python_loop_with_terminations_and_truncations():
    d = random_trajectories(np.random.default_rng(0))
    got = common.gae(
        d["reward"], d["values"], d["next_values"], d["termination"], d["episode_done"], 0.99, 0.9
    )
    want = gae_reference(
        d["reward"], d["values"], d["next_values"], d["termination"], d["episode_done"], 0.99, 0.9
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gae_truncation_bootstraps_but_stops_the_recursion():
    # One env, three steps, an episode end at t=1.
    rewards = np.array([[1.0], [2.0], [3.0]], np.float32)
    values = np.array([[0.5], [0.25], [0.125]], np.float32)
    next_values = np.array([[4.0], [8.0], [16.0]], np.float32)
    done = np.array([[0.0], [1.0], [0.0]], np.float32)
    g, lam = 0.9, 0.5
    truncated = np.asarray(common.gae(rewards, values, next_values, np.zeros_like(done), done, g, lam))
    terminated = np.asarray(common.gae(rewards, values, next_values, done, done, g, lam))
    a2 = 3.0 + g * 16.0 - 0.125
    np.testing.assert_allclose(truncated[2, 0], a2, rtol=1e-6)
    np.testing.assert_allclose(truncated[1, 0], 2.0 + g * 8.0 - 0.25, rtol=1e-6)  # no a2 term
    np.testing.assert_allclose(terminated[1, 0], 2.0 - 0.25, rtol=1e-6)  # no bootstrap either
    a0 = 1.0 + g * 4.0 - 0.5
    np.testing.assert_allclose(truncated[0, 0], a0 + g * lam * truncated[1, 0], rtol=1e-6)


def test_value_targets_are_gae_of_scaled_rewards_plus_values():
    rng = np.random.default_rng(1)
    d = random_trajectories(rng, T=20, N=4)
    obs = rng.normal(size=(20, 4, 3)).astype(np.float32)
    next_obs = rng.normal(size=(20, 4, 3)).astype(np.float32)
    w = np.array([0.3, -1.0, 2.0], np.float32)
    data = {
        "obs": obs,
        "next_obs": next_obs,
        "reward": d["reward"],
        "termination": d["termination"],
        "episode_done": d["episode_done"],
    }
    advantages, targets = common.value_targets(lambda o: o @ w, data, 10.0, 0.995, 0.95)
    values, next_values = obs @ w, next_obs @ w
    want = gae_reference(10.0 * d["reward"], values, next_values, d["termination"], d["episode_done"], 0.995, 0.95)
    np.testing.assert_allclose(advantages, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(targets, np.asarray(advantages) + values, rtol=1e-6, atol=1e-6)


def test_gae_release_is_braxs_compute_gae():
    from brax.training.agents.ppo import losses as brax_losses

    d = random_trajectories(np.random.default_rng(3), T=30, N=6)
    # Brax reads V(s_t+1) from values[1:]: where no episode ended, the true next observation is
    # the next row's, so its value is the next row's value.
    ended = d["episode_done"] > 0
    next_values = np.where(ended[:-1], d["next_values"][:-1], d["values"][1:])
    next_values = np.concatenate([next_values, d["next_values"][-1:]])
    got_adv, got_targets = common.gae_release(d["reward"], d["values"], next_values, d["termination"],
                                              d["truncation"], 0.99, 0.9)
    want_targets, want_adv = brax_losses.compute_gae(
        truncation=d["truncation"], termination=d["termination"], rewards=d["reward"], values=d["values"],
        bootstrap_value=next_values[-1], lambda_=0.9, discount=0.99)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_targets, want_targets, rtol=1e-5, atol=1e-5)
    # Truncated steps are left out; the one-step advantage differs from GAE's lambda-return one.
    assert np.all(np.asarray(got_adv)[d["truncation"] > 0] == 0)
    gae_adv = np.asarray(common.gae(d["reward"], d["values"], next_values, d["termination"], d["episode_done"], 0.99, 0.9))
    assert np.abs(gae_adv - np.asarray(got_adv))[~ended].max() > 1e-3


def test_advantages_and_targets_forms():
    d = random_trajectories(np.random.default_rng(4), T=20, N=4)
    data = {k: d[k] for k in ("reward", "termination", "truncation", "episode_done")}
    adv, targets = common.advantages_and_targets(d["values"], d["next_values"], data, 10.0, 0.99, 0.9)
    want = gae_reference(10.0 * d["reward"], d["values"], d["next_values"], d["termination"], d["episode_done"], 0.99, 0.9)
    np.testing.assert_allclose(adv, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(targets, want + d["values"], rtol=1e-4, atol=1e-4)
    adv, targets = common.advantages_and_targets(d["values"], d["next_values"], data, 10.0, 0.99, 0.9, "release")
    want_adv, want_targets = common.gae_release(10.0 * d["reward"], d["values"], d["next_values"], d["termination"],
                                                d["truncation"], 0.99, 0.9)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-6)
    np.testing.assert_allclose(targets, want_targets, rtol=1e-6)


def test_to_sequences_cuts_each_environment_into_consecutive_steps():
    T, n, L = 12, 3, 4
    x = np.arange(T)[:, None] * 10 + np.arange(n)[None, :]  # step * 10 + environment
    seq = np.asarray(common.to_sequences(jnp.asarray(x), L))
    assert seq.shape == (T // L * n, L)
    for s in seq:
        env = s[0] % 10
        np.testing.assert_array_equal(s % 10, env)  # one environment
        np.testing.assert_array_equal(np.diff(s // 10), 1)  # consecutive steps
    assert sorted(seq.ravel().tolist()) == sorted(x.ravel().tolist())  # every step exactly once


# ---------------------------------------------------------------------------------------------
# Observation normalizer
# ---------------------------------------------------------------------------------------------


def test_normalizer_matches_numpy_over_a_stream_of_batches():
    rng = np.random.default_rng(2)
    shapes = [(1,), (7,), (300,), (4, 25), (2,), (1000,)]
    batches = [
        (rng.normal(size=(*s, 3)) * [1.0, 0.01, 5.0] + [100.0 * i, -3.0, 1e3]).astype(np.float32)
        for i, s in enumerate(shapes)
    ]
    norm = common.normalizer_init(3)
    update = jax.jit(common.normalizer_update)
    for b in batches:
        norm = update(norm, b)
    everything = np.concatenate([b.reshape(-1, 3) for b in batches]).astype(np.float64)
    assert float(norm.count) == len(everything)
    np.testing.assert_allclose(norm.mean, everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.m2 / norm.count, everything.var(0), rtol=1e-3)
    x = everything[:50]
    want = (x - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-8)
    np.testing.assert_allclose(common.normalize(norm, x.astype(np.float32)), want, rtol=1e-3, atol=1e-3)


def test_normalizer_without_kept_variance_is_the_releases_batch_only_welford_update():
    """The release's `update_legacy_batch_only` (GoRL-FM on FishSwim), written out as its
    Welford step: the mean and count run over everything, the variance sum restarts at each batch."""
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(n, 2)).astype(np.float32) * [1.0, 3.0] + [i, -i] for i, n in enumerate((5, 40, 40, 40))]
    count, mean, var_sum = 0.0, np.zeros(2), np.zeros(2)
    norm = common.normalizer_init(2)
    for b in batches:
        x = b.astype(np.float64)
        count += len(x)
        new_mean = mean + (x - mean).sum(0) / count
        var_sum = ((x - mean) * (x - new_mean)).sum(0)  # the earlier batches' sum dropped
        mean = new_mean
        norm = common.normalizer_update(norm, b, keep_variance=False)
        np.testing.assert_allclose(norm.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norm.m2, var_sum, rtol=1e-4)
    assert float(norm.count) == count
    # The std is the newest batch's spread over all observations: far below the data's.
    everything = np.concatenate(batches)
    assert np.all(np.sqrt(norm.m2 / norm.count) < 0.7 * everything.std(0))


def test_normalize_before_any_data_is_identity():
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32) * 100
    np.testing.assert_array_equal(common.normalize(common.normalizer_init(4), x), x)


# ---------------------------------------------------------------------------------------------
# Diagonal Gaussian and KL
# ---------------------------------------------------------------------------------------------


def test_gaussian_log_prob_and_entropy_match_scipy():
    rng = np.random.default_rng(4)
    mean = rng.normal(size=(6, 3)).astype(np.float32)
    scale = rng.uniform(0.05, 3.0, size=(6, 3)).astype(np.float32)
    x = rng.normal(size=(6, 3)).astype(np.float32) * 2
    np.testing.assert_allclose(
        common.gaussian_log_prob(x, mean, scale), stats.norm.logpdf(x, mean, scale).sum(-1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        common.gaussian_entropy(scale), stats.norm.entropy(scale=scale).sum(-1), rtol=1e-5, atol=1e-5
    )


def test_gaussian_scale_bounds():
    raw = np.linspace(-1e3, 1e3, 2001, dtype=np.float32)
    out = np.stack([np.zeros_like(raw), raw], axis=-1)
    mean, scale = common.gaussian_from_output(out)
    np.testing.assert_array_equal(mean[..., 0], 0.0)
    assert float(scale.min()) == pytest.approx(1e-3, rel=1e-6)
    assert float(scale.max()) == pytest.approx(10.0, rel=1e-6)
    assert np.all(np.diff(np.asarray(scale[..., 0])) >= 0)
    np.testing.assert_allclose(
        common.gaussian_from_output(np.array([0.0, 0.0], np.float32))[1], np.log(2.0) + 1e-3, rtol=1e-6
    )


def test_zero_weight_layer_with_unit_scale_bias_gives_the_prior():
    action_size, obs_size = 3, 4
    layer = {
        "w": jnp.zeros((obs_size, 2 * action_size)),
        "b": jnp.concatenate([jnp.zeros(action_size), jnp.full(action_size, common.unit_scale_bias())]),
    }
    obs = np.random.default_rng(5).normal(size=(10, obs_size)).astype(np.float32)
    mean, scale = common.gaussian_from_output(common.mlp_apply([layer], obs))
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(scale, 1.0, rtol=0, atol=2e-7)


def test_mlp_shapes():
    params = common.mlp_init(jax.random.PRNGKey(0), [5, 8, 8, 2])
    assert [p["w"].shape for p in params] == [(5, 8), (8, 8), (8, 2)]
    assert all(np.all(p["b"] == 0) for p in params)
    assert common.mlp_apply(params, jnp.ones((7, 5))).shape == (7, 2)


def test_kl_to_standard_normal_closed_form_zero_and_positive():
    rng = np.random.default_rng(6)
    mean = rng.normal(size=(20, 4)).astype(np.float32)
    scale = rng.uniform(0.1, 3.0, size=(20, 4)).astype(np.float32)
    # Per dimension: log(1/s) + (s^2 + m^2)/2 - 1/2.
    want = (-np.log(scale) + (scale**2 + mean**2) / 2 - 0.5).sum(-1)
    kl = common.kl_to_standard_normal(mean, scale)
    assert kl.shape == (20,)
    np.testing.assert_allclose(kl, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(kl) > 0)
    np.testing.assert_array_equal(common.kl_to_standard_normal(np.zeros(4), np.ones(4)), 0.0)
    # Only the mean off the prior, or only the scale: still positive.
    assert float(common.kl_to_standard_normal(np.array([0.01, 0.0]), np.ones(2))) > 0
    assert float(common.kl_to_standard_normal(np.zeros(2), np.array([1.0, 0.9]))) > 0


def test_kl_to_standard_normal_matches_monte_carlo():
    mean = np.array([0.5, -1.0, 0.0])
    scale = np.array([0.7, 1.8, 0.2])
    rng = np.random.default_rng(7)
    x = mean + scale * rng.normal(size=(200_000, 3))
    log_ratio = (stats.norm.logpdf(x, mean, scale) - stats.norm.logpdf(x)).sum(-1)
    estimate, stderr = log_ratio.mean(), log_ratio.std() / math.sqrt(len(log_ratio))
    kl = float(common.kl_to_standard_normal(mean.astype(np.float32), scale.astype(np.float32)))
    assert abs(kl - estimate) < 5 * stderr + 1e-5, (kl, estimate, stderr)


# ---------------------------------------------------------------------------------------------
# Minibatch SGD and the clipped surrogate
# ---------------------------------------------------------------------------------------------


def test_minibatch_sgd_visits_every_sample_once_per_epoch():
    n, num_epochs, num_minibatches = 24, 3, 4
    size = n // num_minibatches

    def update(carry, minibatch):
        step, order = carry
        order = order.at[step].set(minibatch["id"])
        metrics = {"step": step.astype(jnp.float32), "x": minibatch["x"].mean()}
        return (step + 1, order), metrics

    data = {"id": jnp.arange(n), "x": jnp.arange(n, dtype=jnp.float32) ** 2}
    carry = (jnp.int32(0), jnp.full((num_epochs * num_minibatches, size), -1))
    (steps, order), metrics = common.minibatch_sgd(update, carry, data, jax.random.PRNGKey(0), num_epochs, num_minibatches)
    assert int(steps) == num_epochs * num_minibatches
    order = np.asarray(order).reshape(num_epochs, n)
    for epoch in order:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))  # each sample exactly once
    assert not np.array_equal(order[0], order[1]) and not np.array_equal(order[0], np.arange(n))  # shuffled
    # Metrics are averaged over every minibatch step of every epoch.
    assert float(metrics["step"]) == pytest.approx((num_epochs * num_minibatches - 1) / 2)
    assert float(metrics["x"]) == pytest.approx(float(data["x"].mean()), rel=1e-6)


def test_minibatch_sgd_shuffles_whole_sequences_and_flattens_them():
    n, steps, num_minibatches = 8, 5, 2
    size = n // num_minibatches * steps
    data = {"id": jnp.arange(n * steps).reshape(n, steps)}  # sequence i holds 5i, ..., 5i + 4

    def update(carry, minibatch):
        step, order = carry
        assert minibatch["id"].shape == (size,)  # [sequences * steps]
        return (step + 1, order.at[step].set(minibatch["id"])), {}

    carry = (jnp.int32(0), jnp.full((num_minibatches, size), -1))
    (_, order), _ = common.minibatch_sgd(update, carry, data, jax.random.PRNGKey(0), 1, num_minibatches, flatten=True)
    order = np.asarray(order)
    np.testing.assert_array_equal(np.sort(order.ravel()), np.arange(n * steps))  # every step once
    blocks = order.reshape(-1, steps)  # consecutive runs of 5: whole sequences, in order
    np.testing.assert_array_equal(blocks - blocks[:, :1], np.tile(np.arange(steps), (len(blocks), 1)))
    assert np.all(blocks[:, 0] % steps == 0)
    assert not np.array_equal(blocks[:, 0], np.arange(0, n * steps, steps))  # shuffled


def surrogate_reference(log_ratio, a, clip_eps):
    r = np.exp(log_ratio)
    return (-np.minimum(r * a, np.clip(r, 1 - clip_eps, 1 + clip_eps) * a).mean(), np.mean(np.abs(r - 1) > clip_eps),
            np.mean(r - 1 - log_ratio))


def test_clipped_surrogate_at_ratio_one():
    adv = np.random.default_rng(8).normal(size=64).astype(np.float32) * 3 + 1
    loss, clip_fraction, approx_kl = common.clipped_surrogate(np.zeros(64, np.float32), adv, 0.2)
    assert float(loss) == pytest.approx(-adv.mean(), rel=1e-6)  # the advantages as given
    assert float(clip_fraction) == 0.0 and float(approx_kl) == 0.0


def test_clipped_surrogate_hand_made_case():
    adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    ratio = np.array([1.5, 1.5, 0.5, 1.1], np.float32)
    loss, clip_fraction, approx_kl = common.clipped_surrogate(np.log(ratio), adv, 0.2)
    # min(r A, clip(r) A): 1.2, -1.5, 0.5, -1.1
    assert float(loss) == pytest.approx(-(1.2 - 1.5 + 0.5 - 1.1) / 4, rel=1e-5)
    assert float(clip_fraction) == pytest.approx(0.75)
    assert float(approx_kl) == pytest.approx(np.mean(ratio - 1 - np.log(ratio)), rel=1e-5)
    rng = np.random.default_rng(9)
    log_ratio, adv = rng.normal(size=100).astype(np.float32) * 0.3, rng.normal(size=100).astype(np.float32)
    want = surrogate_reference(log_ratio, adv, 0.2)
    got = common.clipped_surrogate(log_ratio, adv, 0.2)
    assert [float(x) for x in got] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert float(got[2]) > 0  # the k3 estimate of KL is positive away from r = 1


def test_explained_variance():
    rng = np.random.default_rng(10)
    targets = rng.normal(size=200).astype(np.float32) * 2 + 3
    noise = rng.normal(size=200).astype(np.float32)
    assert float(common.explained_variance(targets, targets)) == pytest.approx(1.0)
    assert float(common.explained_variance(np.full(200, 3.0, np.float32), targets)) == pytest.approx(0.0, abs=1e-6)
    want = 1 - np.var(targets - (targets + noise)) / np.var(targets)
    assert float(common.explained_variance(targets + noise, targets)) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Environments, rollouts and evaluation (CartpoleBalance, 5-step episodes)
# ---------------------------------------------------------------------------------------------

TASK = "CartpoleBalance"
NUM_ENVS, EPISODE_LENGTH, NUM_STEPS = 3, 5, 12


@pytest.fixture(scope="module")
def cartpole():
    """`make_env` with 5-step episodes, and one jitted probe.

    `probe(key, pre_squash, raw)` resets `make_env`'s task with `key`, rolls it out for
    NUM_STEPS under the constant pre-squash action `pre_squash` (via `common.rollout`), and from
    the same initial state steps the bare task (no auto-reset, no time limit, no squashing)
    under the constant action `raw`.
    """
    env = common.make_env(TASK, episode_length=EPISODE_LENGTH)
    bare = brax_wrappers.VmapWrapper(registry.load(TASK, config_overrides={"impl": "jax"}))

    @jax.jit
    def probe(key, pre_squash, raw):
        state = common.reset_envs(env, key, NUM_ENVS)

        def policy(obs, key):
            return jnp.full((obs.shape[0], env.action_size), pre_squash), {"obs_sum": obs.sum(-1)}

        _, data = common.rollout(env, state, policy, jax.random.PRNGKey(123), NUM_STEPS)

        def bare_step(s, _):
            s = bare.step(s, jnp.full((NUM_ENVS, env.action_size), raw))
            return s, (s.obs, s.reward)

        _, (bare_obs, bare_reward) = jax.lax.scan(bare_step, state, None, length=NUM_STEPS)
        return state.obs, data, bare_obs, bare_reward

    # float32 scalars, so that every call reuses the one compilation
    return env, lambda key, pre_squash, raw: probe(key, np.float32(pre_squash), np.float32(raw))


KEY = jax.random.PRNGKey(42)


def test_unknown_task_is_a_clear_error():
    ok, message = running.env_name_check("NoSuchTask")
    assert not ok and "NoSuchTask" in message and "CartpoleBalance" in message and "HopperStand" in message
    assert running.env_name_check(TASK)[0]
    with pytest.raises(SystemExit, match="NoSuchTask"):
        common.make_env("NoSuchTask")
    with pytest.raises(SystemExit, match="first problem[\\s\\S]*second problem"):
        running.check_args([(False, "first problem"), (True, "fine"), (False, "second problem")])
    running.check_args([(True, "fine")])


@pytest.mark.slow
def test_rollout_fields_and_shapes(cartpole):
    env, probe = cartpole
    reset_obs, data, _, _ = probe(KEY, 0.3, 0.0)
    obs_size, action_size = env.observation_size, env.action_size
    shapes = {
        "obs": (NUM_STEPS, NUM_ENVS, obs_size),
        "next_obs": (NUM_STEPS, NUM_ENVS, obs_size),
        "action": (NUM_STEPS, NUM_ENVS, action_size),
        "reward": (NUM_STEPS, NUM_ENVS),
        "termination": (NUM_STEPS, NUM_ENVS),
        "truncation": (NUM_STEPS, NUM_ENVS),
        "episode_done": (NUM_STEPS, NUM_ENVS),
        "episode_return": (NUM_STEPS, NUM_ENVS),
        "obs_sum": (NUM_STEPS, NUM_ENVS),  # the policy's extras
    }
    assert {k: v.shape for k, v in data.items()} == shapes
    assert all(np.all(np.isfinite(v)) for v in data.values())
    np.testing.assert_array_equal(data["obs"][0], reset_obs)
    np.testing.assert_allclose(data["obs_sum"], data["obs"].sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(data["action"], np.float32(0.3))  # stored pre-squash


@pytest.mark.slow
def test_truncation_and_true_next_observation(cartpole):
    _, probe = cartpole
    reset_obs, data, bare_obs, bare_reward = map(jax.device_get, probe(KEY, 0.5, np.tanh(0.5)))
    ends = np.zeros(NUM_STEPS, bool)
    ends[EPISODE_LENGTH - 1 :: EPISODE_LENGTH] = True  # steps 4 and 9
    expected = np.broadcast_to(ends[:, None], (NUM_STEPS, NUM_ENVS)).astype(np.float32)
    np.testing.assert_array_equal(data["truncation"], expected)
    np.testing.assert_array_equal(data["episode_done"], expected)
    np.testing.assert_array_equal(data["termination"], 0.0)  # a time limit is not a terminal
    for t in range(NUM_STEPS - 1):
        if ends[t]:
            # Auto-reset: the next row starts from a reset observation, the true last one is kept.
            np.testing.assert_allclose(data["obs"][t + 1], reset_obs, atol=1e-6)
            assert np.all(np.abs(data["next_obs"][t] - data["obs"][t + 1]).max(-1) > 1e-3)
        else:
            np.testing.assert_array_equal(data["next_obs"][t], data["obs"][t + 1])
    # The first episode is exactly the bare task's first EPISODE_LENGTH steps, including the true
    # observation at the truncation.
    n = EPISODE_LENGTH
    np.testing.assert_allclose(data["next_obs"][:n], bare_obs[:n], atol=1e-5)
    np.testing.assert_allclose(data["reward"][:n], bare_reward[:n], atol=1e-5)
    # The second episode replays the first one (same start, same constant action).
    np.testing.assert_allclose(data["next_obs"][n : 2 * n], bare_obs[:n], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_start_states_redraw_each_episodes_start_without_cutting_episodes(cartpole, fresh):
    """Rollouts of 3 steps over 5-step episodes: 3 episodes begin at global steps 0, 5 and 10."""
    env, _ = cartpole
    per_rollout, rollouts = 3, 5

    @jax.jit
    def run(key):
        state = common.reset_envs(env, key, NUM_ENVS)

        def policy(obs, key):
            return jnp.zeros((obs.shape[0], env.action_size)), {}

        def iteration(state, key):
            return common.rollout(env, state, policy, key, per_rollout, fresh_start_states=fresh)

        _, data = jax.lax.scan(iteration, state, jax.random.split(jax.random.PRNGKey(7), rollouts))
        return jax.tree.map(lambda x: x.reshape((rollouts * per_rollout,) + x.shape[2:]), data)

    data = jax.device_get(run(KEY))
    starts = data["obs"][[0, EPISODE_LENGTH, 2 * EPISODE_LENGTH]]  # [3 episodes, envs, obs]
    if fresh:  # every episode, in every environment, from a start state of its own
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert np.all(np.abs(starts[i] - starts[j]).max(-1) > 1e-4)
    else:  # today's auto-reset: the first reset's state again and again
        np.testing.assert_array_equal(starts[1], starts[0])
        np.testing.assert_array_equal(starts[2], starts[0])
    # Episodes in progress are not cut: they end only at the time limit, and between rollouts
    # the next observation is the one the environment continues from.
    ends = np.zeros(rollouts * per_rollout, bool)
    ends[EPISODE_LENGTH - 1 :: EPISODE_LENGTH] = True
    np.testing.assert_array_equal(data["episode_done"], np.broadcast_to(ends[:, None], data["episode_done"].shape))
    for t in np.flatnonzero(~ends[:-1]):
        np.testing.assert_array_equal(data["next_obs"][t], data["obs"][t + 1])


@pytest.mark.slow
def test_actions_are_squashed_by_tanh(cartpole):
    _, probe = cartpole
    n = EPISODE_LENGTH
    _, huge, bare_one, _ = probe(KEY, 1e6, 1.0)
    np.testing.assert_allclose(huge["next_obs"][:n], bare_one[:n], atol=1e-5)
    _, half, bare_tanh_half, _ = probe(KEY, 0.5, np.tanh(0.5))
    np.testing.assert_allclose(half["next_obs"][:n], bare_tanh_half[:n], atol=1e-5)
    _, _, bare_half, _ = probe(KEY, 0.5, 0.5)
    # Control: the action matters, so the matches above are not trivial.
    assert np.abs(np.asarray(half["next_obs"][:n]) - np.asarray(bare_half[:n])).max() > 1e-4


@pytest.mark.slow
def test_completed_episode_return(cartpole):
    _, probe = cartpole
    _, data, _, _ = map(jax.device_get, probe(KEY, -0.2, 0.0))
    n = EPISODE_LENGTH
    per_episode = np.concatenate([data["reward"][:n].sum(0), data["reward"][n : 2 * n].sum(0)])
    done_returns = data["episode_return"][data["episode_done"] == 1]
    np.testing.assert_allclose(np.sort(done_returns), np.sort(per_episode), rtol=1e-5)
    mean_return, count = common.completed_episode_return(data)
    assert int(count) == 2 * NUM_ENVS
    assert float(mean_return) == pytest.approx(per_episode.mean(), rel=1e-5)
    first_rows = {k: v[: n - 1] for k, v in data.items()}  # no episode ends in there
    mean_return, count = common.completed_episode_return(first_rows)
    assert int(count) == 0 and math.isnan(float(mean_return))


@pytest.mark.slow
def test_evaluator_returns_the_mean_of_each_envs_first_episode(cartpole):
    env, probe = cartpole
    # Longer than an episode: rewards after each environment's first episode must not count.
    evaluate = jax.jit(common.make_evaluator(env, NUM_ENVS, episode_length=EPISODE_LENGTH + 3), static_argnums=0)
    act = lambda obs, key: jnp.full((obs.shape[0], env.action_size), 0.7)  # noqa: E731
    result = jax.device_get(evaluate(act, KEY))
    got = float(result["eval/return"])
    _, data, _, _ = jax.device_get(probe(KEY, 0.7, 0.0))
    returns = np.zeros(NUM_ENVS)
    for t in range(EPISODE_LENGTH):  # manual sum over the first episode (same reset key, same action)
        returns += data["reward"][t]
    assert got == pytest.approx(returns.mean(), rel=1e-5)
    assert float(result["eval/return_std"]) == pytest.approx(returns.std(), rel=1e-4, abs=1e-6)
    assert float(result["eval/episode_length"]) == EPISODE_LENGTH  # the time limit, not the scan's length
    assert got != pytest.approx(data["reward"][: EPISODE_LENGTH + 3].sum(0).mean(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Refinement data split and best-validation training
# ---------------------------------------------------------------------------------------------


def test_split_episodes_holds_out_whole_episodes():
    episode_length, per_env, num_envs = 5, 4, 3
    # Label every transition with its (environment, episode-in-environment) id and its time step.
    t = np.arange(per_env * episode_length)
    ids = (t // episode_length)[:, None] * 10 + np.arange(num_envs)[None, :]
    data = {"id": jnp.asarray(ids), "t": jnp.asarray(np.broadcast_to(t[:, None] % episode_length, ids.shape))}
    train, val = common.split_episodes(data, jax.random.PRNGKey(0), 0.25, episode_length)
    assert val["id"].shape == (3 * episode_length,) and train["id"].shape == (9 * episode_length,)
    train_ids, val_ids = set(np.asarray(train["id"]).tolist()), set(np.asarray(val["id"]).tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == per_env * num_envs
    # Each held-out episode is complete and in order.
    np.testing.assert_array_equal(np.asarray(val["t"]).reshape(3, episode_length), np.tile(np.arange(5), (3, 1)))
    assert len(set(np.asarray(val["id"]).reshape(3, episode_length)[:, 0].tolist())) == 3
    # Another key holds out other episodes.
    _, other = common.split_episodes(data, jax.random.PRNGKey(1), 0.25, episode_length)
    assert set(np.asarray(other["id"]).tolist()) != val_ids


def test_fit_keep_best_returns_the_best_validation_parameters_not_the_last():
    """Training pulls w to 2; validation prefers w = 1, passed on the way. The decoder kept is
    the one from the validation check nearest w = 1, not the overfit final one."""
    train = {"x": jnp.zeros((64, 1))}
    loss_fn = lambda p, batch, key: jnp.mean((p["w"] - 2.0 + 0 * batch["x"]) ** 2)  # noqa: E731
    val_fn = lambda p: (p["w"] - 1.0) ** 2  # noqa: E731
    best, metrics = jax.jit(lambda p, k: common.fit_keep_best(
        loss_fn, val_fn, p, optax.sgd(0.05), train, k, num_steps=200, batch_size=8, eval_every=2))(
        {"w": jnp.float32(0.0)}, jax.random.PRNGKey(0))
    final_w = 2.0 - 2.0 * (1 - 0.1) ** 200  # plain gradient descent on (w - 2)^2 from 0
    assert abs(final_w - 2.0) < 1e-6
    assert abs(float(best["w"]) - 1.0) < 0.1
    assert 0 < int(metrics["refine/best_step"]) < 200
    np.testing.assert_allclose(float(metrics["refine/val_best"]), (float(best["w"]) - 1.0) ** 2, rtol=1e-5)
    assert float(metrics["refine/val_final"]) > 0.9 and float(metrics["refine/val_initial"]) == 1.0
