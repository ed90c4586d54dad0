"""GoRL-FM: the math that defines the method, and a staged run with resume."""

import csv
import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import running
import gorl_fm

OBS, ACT = 7, 3
ARGS = gorl_fm.resolve(gorl_fm.Args())


def random_states(n=256, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, OBS)) * 3.0


def test_decoder_is_identity_at_init():
    params = gorl_fm.init_decoder(jax.random.PRNGKey(1), OBS, ACT, ARGS)
    z = jax.random.normal(jax.random.PRNGKey(2), (256, ACT)) * 2.0
    a = gorl_fm.decode(params, random_states(), z, flow_steps=10)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(z))


def test_reinitialized_encoder_is_the_prior():
    for seed in range(3):
        params = gorl_fm.init_encoder(jax.random.PRNGKey(seed), OBS, ACT, ARGS)
        mean, scale = gorl_fm.encoder(params, random_states(seed=seed + 10))
        np.testing.assert_array_equal(np.asarray(mean), 0.0)
        np.testing.assert_allclose(np.asarray(scale), 1.0, rtol=0, atol=1e-6)
        # Hidden layers stay random: the encoder can move off the prior once trained.
        assert float(jnp.abs(params[0]["w"]).sum()) > 0


def kl_numpy(mean, scale):
    return 0.5 * np.sum(mean**2 + scale**2 - 1.0 - 2.0 * np.log(scale), axis=-1)


def test_kl_regularizer_closed_form_zero_positive_and_monte_carlo():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, ACT)).astype(np.float32)
    scale = rng.uniform(0.3, 2.0, size=(5, ACT)).astype(np.float32)
    kl = np.asarray(common.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(scale)))
    np.testing.assert_allclose(kl, kl_numpy(mean, scale), rtol=1e-5)
    assert np.all(kl > 0)
    assert float(common.kl_to_standard_normal(jnp.zeros(ACT), jnp.ones(ACT))) == 0.0
    # Monte Carlo: E_q[log q(z) - log p(z)] with z ~ q.
    n = 400_000
    z = mean[0] + scale[0] * rng.normal(size=(n, ACT))
    log_q = np.sum(-0.5 * ((z - mean[0]) / scale[0]) ** 2 - np.log(scale[0]), axis=-1)
    log_p = np.sum(-0.5 * z**2, axis=-1)
    mc = np.mean(log_q - log_p)
    stderr = np.std(log_q - log_p) / np.sqrt(n)
    assert abs(mc - kl[0]) < 5 * stderr + 1e-3


def test_kl_in_latent_loss_is_the_true_kl_not_an_l2_penalty():
    """The loss's KL term pulls sigma to 1: it is zero at the prior and grows as sigma -> 0."""
    params = {
        "encoder": gorl_fm.init_encoder(jax.random.PRNGKey(0), OBS, ACT, ARGS),
        "critic": common.mlp_init(jax.random.PRNGKey(1), [OBS, 16, 1]),
    }
    batch = fake_batch(64)
    hp = gorl_fm.stage_hyperparameters(ARGS, 1)
    _, metrics = gorl_fm.latent_ppo_loss(params, batch, hp, ARGS)
    assert abs(float(metrics["loss/kl_prior"])) < 1e-5
    # Shrink sigma through the scale bias: an L2 penalty on (mu, sigma) would call this better.
    small = jax.tree.map(lambda x: x, params)
    small["encoder"][-1]["b"] = small["encoder"][-1]["b"].at[ACT:].set(-3.0)
    _, metrics_small = gorl_fm.latent_ppo_loss(small, batch, hp, ARGS)
    mean, scale = gorl_fm.encoder(small["encoder"], batch["obs"])
    expected = kl_numpy(np.asarray(mean), np.asarray(scale)).mean()
    np.testing.assert_allclose(float(metrics_small["loss/kl_prior"]), expected, rtol=1e-5)
    assert expected > 1.0


def fake_batch(n, seed=3):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    latent = jax.random.normal(k[0], (n, ACT))
    return {
        "obs": jax.random.normal(k[1], (n, OBS)),
        "latent": latent,
        "log_prob": common.gaussian_log_prob(latent, jnp.zeros(ACT), jnp.ones(ACT)),
        "advantage": jax.random.normal(k[2], (n,)),
        "target": jax.random.normal(k[3], (n,)),
    }


def test_loss_shapes_and_ratio_one_at_rollout_parameters():
    params = {
        "encoder": gorl_fm.init_encoder(jax.random.PRNGKey(0), OBS, ACT, ARGS),
        "critic": common.mlp_init(jax.random.PRNGKey(1), [OBS, 16, 1]),
    }
    batch = fake_batch(32)
    loss, metrics = gorl_fm.latent_ppo_loss(params, batch, gorl_fm.stage_hyperparameters(ARGS, 0), ARGS)
    assert loss.shape == ()
    assert all(v.shape == () and np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["encoder/clip_fraction"]) == 0.0  # the batch's log-probs are the prior's
    grads = jax.grad(lambda p: gorl_fm.latent_ppo_loss(p, batch, gorl_fm.stage_hyperparameters(ARGS, 0), ARGS)[0])(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

    dec = gorl_fm.init_decoder(jax.random.PRNGKey(2), OBS, ACT, ARGS)
    z, t = gorl_fm.refinement_inputs({"action": batch["latent"]}, jax.random.PRNGKey(4), 8)
    assert z.shape == (8, 32, ACT) and t.shape == (8, 32)
    assert gorl_fm.flow_matching_loss(dec, batch["obs"], batch["latent"], z, t).shape == ()
    # The 8 draws per action are averaged: the same as the mean of 8 one-draw losses.
    per_draw = [gorl_fm.flow_matching_loss(dec, batch["obs"], batch["latent"], z[i], t[i]) for i in range(8)]
    np.testing.assert_allclose(float(gorl_fm.flow_matching_loss(dec, batch["obs"], batch["latent"], z, t)),
                               float(np.mean(per_draw)), rtol=1e-5)


def test_flow_matching_loss_is_zero_for_the_true_velocity():
    """Actions a = z + c: the straight path's velocity is the constant c, which a network with
    zero weights and output bias c represents exactly; Euler integration then gives z + c."""
    params = gorl_fm.init_decoder(jax.random.PRNGKey(0), OBS, ACT, ARGS)
    c = jnp.array([0.5, -1.0, 2.0])
    params[-1]["b"] = c
    z = jax.random.normal(jax.random.PRNGKey(1), (128, ACT))
    t = jax.random.uniform(jax.random.PRNGKey(2), (128,))
    obs = random_states(128)
    assert float(gorl_fm.flow_matching_loss(params, obs, z + c, z, t)) == pytest.approx(0.0, abs=1e-10)
    # ...and is positive for a wrong velocity.
    assert float(gorl_fm.flow_matching_loss(params, obs, z - c, z, t)) > 1.0
    np.testing.assert_allclose(np.asarray(gorl_fm.decode(params, obs, z, 10)), np.asarray(z + c), atol=1e-5)


def test_refinement_latents_prior_vs_encoder_ablation():
    batch = {"action": jnp.ones((4096, ACT)), "latent": jnp.full((4096, ACT), 7.0)}
    z_prior, _ = gorl_fm.refinement_inputs(batch, jax.random.PRNGKey(0), 1, "prior")
    z_enc, _ = gorl_fm.refinement_inputs(batch, jax.random.PRNGKey(0), 1, "encoder")
    np.testing.assert_array_equal(np.asarray(z_enc), 7.0)
    assert abs(float(z_prior.mean())) < 0.05 and abs(float(z_prior.std()) - 1.0) < 0.05


def one_state_dataset(actions, obs_row, episodes):
    """A refinement dataset laid out as a rollout, [1000 * episodes, 1 env, .], at one state."""
    n = len(actions)
    return {"obs": jnp.asarray(np.tile(obs_row, (n, 1)))[:, None], "action": jnp.asarray(actions)[:, None],
            "latent": jnp.zeros((n, 1, actions.shape[-1]))}


FAKE_ENV = types.SimpleNamespace(observation_size=4, action_size=1, episode_length=common.EPISODE_LENGTH)


def test_decoder_fit_to_bimodal_actions_generates_both_modes():
    """Fit by the refinement's own `fit` (fresh decoder, prior latents) to actions at +-1.5."""
    args = dataclasses.replace(ARGS, refine_envs=1, refine_episodes=3, refine_steps=1000, refine_eval_every=100,
                               refine_batch_size=250, refine_draws=4, refine_learning_rate=3e-3, refine_val_size=1000)
    rng = np.random.default_rng(0)
    actions = np.where(rng.random((3000, 1)) < 0.5, -1.5, 1.5).astype(np.float32)
    obs_row = np.array([[0.3, -0.2, 1.0, 0.5]], np.float32)
    _, fit = gorl_fm.make_refinement(FAKE_ENV, args)
    decoder, norm, metrics = fit(None, one_state_dataset(actions, obs_row, 3), jax.random.PRNGKey(1))
    assert float(metrics["refine/val_best"]) < float(metrics["refine/val_initial"])
    z = jax.random.normal(jax.random.PRNGKey(2), (4000, 1))
    obs = common.normalize(norm, jnp.asarray(np.tile(obs_row, (4000, 1))))
    a = np.asarray(gorl_fm.decode(decoder, obs, z, 10))[:, 0]
    near_low, near_high = np.mean(np.abs(a + 1.5) < 0.5), np.mean(np.abs(a - 1.5) < 0.5)
    assert near_low > 0.3 and near_high > 0.3, (near_low, near_high)
    assert np.mean(np.abs(a) < 0.5) < 0.15


def test_fresh_decoder_is_the_identity_until_it_beats_it_on_validation():
    """With a zero learning rate nothing improves on the held-out episodes, so the refinement
    hands back its fresh decoder: the exact identity (and never the previous stage's decoder)."""
    args = dataclasses.replace(ARGS, refine_envs=1, refine_episodes=2, refine_steps=20, refine_eval_every=10,
                               refine_batch_size=64, refine_learning_rate=0.0, refine_val_size=500)
    actions = np.random.default_rng(0).normal(size=(2000, 1)).astype(np.float32)
    _, fit = gorl_fm.make_refinement(FAKE_ENV, args)
    previous = gorl_fm.init_decoder(jax.random.PRNGKey(5), 4, 1, args)
    previous[-1]["b"] = jnp.ones(1)  # not the identity
    decoder, _, metrics = fit(previous, one_state_dataset(actions, np.ones((1, 4), np.float32), 2), jax.random.PRNGKey(0))
    z = jnp.linspace(-3, 3, 13)[:, None]
    np.testing.assert_array_equal(np.asarray(gorl_fm.decode(decoder, jnp.zeros((13, 4)), z, 10)), np.asarray(z))
    assert int(metrics["refine/best_step"]) == 0


def test_regression_targets_are_clipped_as_released():
    a = jnp.array([[-5.0, -2.0, 0.5, 4.0]])
    np.testing.assert_array_equal(np.asarray(common.regression_targets(a, "pre_squash", 3.0)), [[-3.0, -2.0, 0.5, 3.0]])
    np.testing.assert_array_equal(np.asarray(common.regression_targets(a, "pre_squash", 0.0)), np.asarray(a))
    # Bounded actions (humanoids): the target is the environment's action in [-1, 1].
    np.testing.assert_array_equal(np.asarray(common.regression_targets(a, "bounded", 1.0)), [[-1.0, -1.0, 0.5, 1.0]])


def test_bounded_latent_and_bounded_actions():
    params = gorl_fm.init_encoder(jax.random.PRNGKey(0), OBS, ACT, ARGS)
    params[-1]["b"] = params[-1]["b"].at[:ACT].set(2.0)
    obs = random_states(4096)
    z, u, log_prob = gorl_fm.sample_latent(params, obs, jax.random.PRNGKey(1), bounded=True)
    np.testing.assert_allclose(np.asarray(z), np.tanh(np.asarray(u)), rtol=1e-6)
    assert float(jnp.abs(z).max()) < 1.0 and float(jnp.abs(u).max()) > 1.0
    # PPO's log-probability is the Gaussian one of u (the tanh Jacobian cancels in the ratio).
    mean, scale = gorl_fm.encoder(params, obs)
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(common.gaussian_log_prob(u, mean, scale)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gorl_fm.mean_latent(params, obs, True)), np.tanh(2.0), rtol=1e-6)
    # The environment applies tanh: a bounded decoder output reaches it clipped to [-1, 1].
    a = jnp.array([-3.0, -0.7, 0.0, 0.4, 1.0, 2.0])
    np.testing.assert_allclose(np.tanh(np.asarray(common.env_action(a, "bounded"))),
                               np.clip(np.asarray(a), -1, 1), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(common.env_action(a, "pre_squash")), np.asarray(a))


# The released values (bennidict23/GoRL: configs/methods/gorl_fm.toml, dm_control profile), so
# that a silent change of a default fails here.
RELEASED_FM = dict(
    stage_steps=(60_000_000, 60_000_000, 30_000_000, 30_000_000), num_envs=2048, unroll_length=30, batch_size=1024,
    num_minibatches=32, num_epochs=16, learning_rate=(1e-3,), discount=0.995, gae_lambda=0.95, vf_coef=0.25,
    ent_coef=(0.01,), reward_scaling=10.0, clip_eps=(0.15, 0.3), max_grad_norm=(0.5, 0.5), kl_beta=(5e-4, 1e-3),
    bounded_latent=False, encoder_hidden=(32,) * 4,
    critic_hidden=(256,) * 5, decoder_hidden=(128,) * 4, flow_steps=10, action_semantics="pre_squash",
    refine_episodes=4096, refine_steps=50_000, refine_batch_size=8192, refine_draws=8,
    refine_learning_rate=3e-4, decoder_target_clip=3.0, decoder_init="fresh", refine_val_fraction=0.1,
    refine_eval_every=100, refine_val_size=65536, refine_metric="val_loss", num_eval_envs=128,
    deterministic_eval=True, encoder_reset=True, latent_regularizer="kl",
)


@pytest.mark.parametrize("field", sorted(RELEASED_FM))
def test_defaults_are_the_released_values(field):
    args = gorl_fm.resolve(gorl_fm.Args(env_name="CheetahRun"))
    assert getattr(args, field) == RELEASED_FM[field]


def test_refinement_collects_all_episodes_at_once_by_default():
    """A documented departure: the release collects its 4096 episodes 64 environments at a time
    (64 sequential episodes); ours run as one batched rollout unless --refine-envs says otherwise."""
    assert gorl_fm.Args().refine_envs is None
    gorl_fm.validate(gorl_fm.resolve(gorl_fm.Args(env_name="CheetahRun", refine_envs=64)))


@pytest.mark.parametrize("env_name, expected", [
    ("FingerSpin", dict(discount=0.95, refine_metric="val_endpoint_mse", max_grad_norm=(0.5, 0.5))),
    ("BallInCup", dict(discount=0.95)),
    ("FingerTurnHard", dict(max_grad_norm=(0.5, 1.0), kl_beta=(5e-4, 1e-3, 1e-3, 1e-2), discount=0.995)),
    # configs/tasks/WalkerWalk.toml: later stages' clip and KL weight, stage 3's learning rate.
    ("WalkerWalk", dict(max_grad_norm=(0.5, 1.0), kl_beta=(5e-4, 3e-3), learning_rate=(1e-3, 1e-3, 1e-3, 3e-4))),
    ("HopperStand", dict(decoder_hidden=(64,) * 4, decoder_target_clip=0.0)),
    ("HumanoidRun", dict(stage_steps=(60_000_000, 60_000_000), bounded_latent=True, clip_eps=(0.3,), matmul_precision="highest",
                         action_semantics="bounded", decoder_target_clip=1.0, refine_episodes=1024,
                         deterministic_eval=False)),
    ("HumanoidStand", dict(stage_steps=(60_000_000, 60_000_000, 30_000_000, 30_000_000), refine_episodes=128,
                           bounded_latent=True)),
    ("CartpoleBalance", dict(discount=0.995, decoder_hidden=(128,) * 4, deterministic_eval=True,
                             normalizer_update=("after",), normalizer_variance=("running",))),
    # configs/tasks/FishSwim.toml: observation_stats_timing "legacy_pre_update", accumulation "legacy_batch_only".
    ("FishSwim", dict(refine_metric="val_endpoint_mse", normalizer_update=("before",),
                      normalizer_variance=("batch",))),
])
def test_task_settings_resolve_per_task(env_name, expected):
    args = gorl_fm.resolve(gorl_fm.Args(env_name=env_name))
    assert {k: getattr(args, k) for k in expected} == expected


def test_a_flag_given_on_the_command_line_beats_the_task_value():
    args = gorl_fm.resolve(gorl_fm.Args(env_name="FingerSpin", discount=0.99, refine_metric="val_loss"))
    assert args.discount == 0.99 and args.refine_metric == "val_loss"


def test_validation_rejects_bad_budgets_before_compiling():
    def check(**kw):
        gorl_fm.validate(gorl_fm.resolve(gorl_fm.Args(**{"env_name": "CartpoleBalance", **kw})))

    with pytest.raises(SystemExit, match="stage"):
        check(stage_steps=(10, 10))
    with pytest.raises(SystemExit, match="unknown task"):
        gorl_fm.make_env(gorl_fm.Args(env_name="NoSuchTask"))
    with pytest.raises(SystemExit, match="multiple of --refine-envs"):
        check(refine_envs=3, refine_episodes=10)
    with pytest.raises(SystemExit, match="refine-val-fraction"):
        check(refine_envs=1, refine_episodes=1)
    with pytest.raises(SystemExit, match="multiple of --refine-eval-every"):
        check(refine_steps=150)
    with pytest.raises(SystemExit, match="decoder-init"):
        check(decoder_init="lukewarm")


TINY = dict(env_name="CartpoleBalance", num_envs=16, batch_size=16, num_minibatches=2, unroll_length=10,
            num_epochs=2, refine_envs=2, refine_episodes=2, refine_steps=20, refine_eval_every=10,
            refine_batch_size=500, refine_draws=2, refine_val_size=1000, eval_every=320, num_eval_envs=4)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_stage_run_and_resume_after_the_first_stage(tmp_path):
    # A run that stops after its first stage (as if killed while stage 1 was running) ...
    gorl_fm.main(gorl_fm.Args(**TINY, stage_steps=(640,), runs_dir=str(tmp_path)))
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "stage0.npz"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(run_dir, "tb")))
    stage0_rows = read_csv(os.path.join(run_dir, "metrics.csv"))
    # ... resumed with a second stage in its budget: stage 0 is not repeated.
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["discount"] == 0.995 and config["decoder_hidden"] == [128] * 4  # resolved values recorded
    config["stage_steps"] = [640, 640]
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    gorl_fm.main(gorl_fm.Args(resume=run_dir))

    rows = read_csv(os.path.join(run_dir, "metrics.csv"))
    train_rows = [r for r in rows if r.get("stage") not in (None, "")]
    assert [int(float(r["stage"])) for r in train_rows] == [0, 0, 1, 1]
    assert [int(r["step"]) for r in train_rows] == [320, 640, 960, 1280]
    # Stage 0's rows survive the resume unchanged (new columns aside).
    assert [{k: r[k] for k in stage0_rows[0]} for r in rows[: len(stage0_rows)]] == stage0_rows
    assert any(r.get("refine/loss_final") not in (None, "") for r in rows)
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    table = open(os.path.join(run_dir, "stages.md")).read()
    assert "| S0 |" in table and "| S1 |" in table

    # The density helper: from stage 0's identity decoder the actions are exactly tanh of the
    # latents (prior draws, or the encoder's samples at the state); stage 1's refined decoder moves them.
    saved = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    stage0 = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "stage0.npz"))
    obs, key = jnp.zeros(saved["norm"].mean.shape), jax.random.PRNGKey(0)
    prior_draws = jnp.tanh(jax.random.normal(key, (100, 1)))
    np.testing.assert_array_equal(gorl_fm.sample_actions(stage0, obs, key, 100, 10, from_prior=True), prior_draws)
    mean, scale = gorl_fm.encoder(stage0["params"]["encoder"], common.normalize(stage0["norm"], jnp.zeros((100, obs.shape[-1]))))
    np.testing.assert_allclose(gorl_fm.sample_actions(stage0, obs, key, 100, 10),
                               jnp.tanh(mean + scale * jax.random.normal(key, mean.shape)), atol=1e-6)
    refined = gorl_fm.sample_actions(saved, obs, key, 100, 10, from_prior=True)
    assert refined.shape == (100, 1) and float(jnp.abs(refined - prior_draws).max()) > 1e-4
    # The stage-1 decoder was refined: it is no longer the identity.
    z = jnp.linspace(-2, 2, 9)[:, None]
    decoded = gorl_fm.decode(saved["decoder"], jnp.zeros((9, obs.shape[0])), z, 10)
    assert float(jnp.abs(decoded - z).max()) > 1e-4
