"""The wiring of every PPO-family training iteration, on a pure-JAX stand-in task (fast).

With a learning rate of 0 the parameters never move, so every minibatch of every epoch sees
the rollout's own policy: the log-ratio is 0, nothing is clipped and the approximate KL is 0,
provided the iteration normalizes observations for the epochs exactly as it did for the
rollout. The normalizer starts far from the task's statistics, so an update of it before the
epochs (Brax's order, `ppo.py --normalizer-update before`) moves every ratio away from 1: the
check fails for that wiring, which is what makes it a test of the order. It also checks that
the normalizer does take in the rollout (after the epochs) and that the returned environment
state is the one the rollout ended in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fake_env import FakeEnv

import common
import running
import dppo
import fpo
import gorl_diffusion
import gorl_fm
import ppo

LAYOUT = dict(env_name="CartpoleBalance", num_envs=4, batch_size=4, num_minibatches=2, unroll_length=7, num_epochs=2)
KEY = jax.random.PRNGKey(0)
ZERO_LR = optax.adam(0.0)


def shifted_normalizer(size):
    """Statistics of 5 observations around 3: far from the fake task's (around 0)."""
    batch = 3.0 + jax.random.normal(jax.random.PRNGKey(9), (5, size))
    return common.normalizer_update(common.normalizer_init(size), batch)


def baseline_state(module, args, env):
    params = module.init_params(KEY, env.observation_size, env.action_size, args)
    env_state = common.reset_envs(env, jax.random.PRNGKey(1), args.num_envs)
    return module.TrainState(params, ZERO_LR.init(params), shifted_normalizer(env.observation_size), env_state)


def gorl_state(module, args, env, optimizer, opt_state_fn):
    k_enc, k_critic, k_dec = jax.random.split(KEY, 3)
    obs, act = env.observation_size, env.action_size
    encoder = module.init_encoder(k_enc, obs, act, args)
    # A stage starts at the prior, whose output ignores the state (zero last layer); give the
    # encoder a state-dependent output, else a wrongly normalized observation would go unseen.
    last = encoder[-1]
    encoder = [*encoder[:-1], dict(last, w=0.3 * jax.random.normal(k_dec, last["w"].shape))]
    params = {"encoder": encoder, "critic": common.mlp_init(k_critic, [obs, *args.critic_hidden, 1])}
    return module.TrainState(
        params=params, opt_state=opt_state_fn(params), hp=module.stage_hyperparameters(args, 1),
        norm=shifted_normalizer(obs), decoder=module.init_decoder(k_dec, obs, act, args),
        decoder_norm=common.normalizer_init(obs),
        env_state=common.reset_envs(env, jax.random.PRNGKey(1), args.num_envs),
    )


def run_one_iteration(algo, **overrides):
    """(state before, state after, metrics, prefix of the policy metrics) of one iteration at lr 0."""
    env = FakeEnv()
    small = dict(critic_hidden=(16,))
    if algo in ("ppo", "fpo", "dppo"):
        module = {"ppo": ppo, "fpo": fpo, "dppo": dppo}[algo]
        args = module.resolve(module.Args(**LAYOUT, **small, actor_hidden=(16,), **overrides))
        state = baseline_state(module, args, env)
        iteration = module.make_train_iteration(env, ZERO_LR, args)
        prefix = "policy"
    else:
        module = {"gorl_fm": gorl_fm, "gorl_diffusion": gorl_diffusion}[algo]
        args = module.resolve(module.Args(**LAYOUT, **small, encoder_hidden=(16,), decoder_hidden=(16,),
                                          learning_rate=(0.0,), **overrides))
        optimizer = optax.scale_by_adam()  # main's: the stage's learning rate (here 0) scales the steps
        state = gorl_state(module, args, env, optimizer, optimizer.init)
        iteration = module.make_train_iteration(env, optimizer, args)
        prefix = "encoder"
    before = jax.tree.map(jnp.array, state)  # a copy, independent of what the iteration returns
    after, metrics = jax.jit(iteration)(state, jax.random.PRNGKey(2))
    return args, before, after, jax.device_get(metrics), prefix


def parts(algo, state):
    """(params, normalizer, environment state) of any file's TrainState."""
    return state.params, state.norm, state.env_state


@pytest.mark.parametrize("algo", ["ppo", "fpo", "dppo", "gorl_fm", "gorl_diffusion"])
def test_at_learning_rate_zero_every_minibatch_sees_the_rollout_policy(algo):
    args, before, after, metrics, prefix = run_one_iteration(algo)
    params_0, norm_0, env_0 = parts(algo, before)
    params_1, norm_1, env_1 = parts(algo, after)
    for a, b in zip(jax.tree.leaves(params_0), jax.tree.leaves(params_1)):
        np.testing.assert_array_equal(a, b)
    assert float(metrics[f"{prefix}/clip_fraction"]) == 0.0
    # Zero up to float rounding: the rollout and the epochs evaluate the networks on batches of
    # different shapes.
    assert abs(float(metrics[f"{prefix}/approx_kl"])) < 1e-6
    steps = args.batch_size * args.num_minibatches * args.unroll_length
    assert float(norm_1.count) == float(norm_0.count) + steps  # the rollout was taken in
    # The iteration hands on the environment where its rollout stopped.
    assert np.abs(np.asarray(env_1.obs) - np.asarray(env_0.obs)).max() > 0
    assert np.isfinite(float(metrics["critic/explained_variance"]))


@pytest.mark.parametrize("algo", ["ppo", "fpo", "dppo", "gorl_fm", "gorl_diffusion"])
def test_at_learning_rate_zero_the_per_minibatch_advantages_see_the_rollout_policy(algo):
    """Brax's update (sequence minibatches, GAE in the loss) with the normalizer after: ratio 1,
    and the one shared implementation runs in every PPO-family script."""
    args, before, after, metrics, prefix = run_one_iteration(
        algo, advantages="minibatch", minibatch_unit="sequence", gae_form="release")
    assert float(metrics[f"{prefix}/clip_fraction"]) == 0.0 and abs(float(metrics[f"{prefix}/approx_kl"])) < 1e-6
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("algo", ["fpo", "dppo", "gorl_fm", "gorl_diffusion"])
def test_normalizer_update_before_moves_the_ratio_in_every_script(algo):
    before = ("before",) if algo.startswith("gorl") else "before"  # per stage in the GoRL files
    _, _, _, metrics, prefix = run_one_iteration(algo, normalizer_update=before)
    assert float(metrics[f"{prefix}/approx_kl"]) > 1e-6


def test_gorl_fm_batch_variance_drops_the_earlier_squared_deviations():
    """--normalizer-variance batch (the release's FishSwim setting) reaches the iteration: the
    same update, less the variance sum the state held before it."""
    _, before, running_after, _, _ = run_one_iteration("gorl_fm", normalizer_variance=("running",))
    _, _, batch_after, _, _ = run_one_iteration("gorl_fm", normalizer_variance=("batch",))
    np.testing.assert_allclose(batch_after.norm.mean, running_after.norm.mean, rtol=1e-6)
    np.testing.assert_allclose(batch_after.norm.m2, running_after.norm.m2 - before.norm.m2, rtol=1e-4, atol=1e-3)
    assert float(before.norm.m2.min()) > 1.0  # so the difference is visible


def test_normalizer_update_before_the_epochs_moves_the_ratio():
    """Brax's order: the epochs see observations normalized with statistics that include the
    rollout, so even at learning rate 0 the ratios are not 1."""
    _, _, _, metrics, _ = run_one_iteration("ppo", normalizer_update="before")
    assert float(metrics["policy/approx_kl"]) > 1e-4



@pytest.mark.parametrize("module", [ppo, fpo, dppo], ids=lambda m: m.__name__)
def test_resume_of_a_run_without_a_checkpoint_is_a_clear_error(module, tmp_path):
    args = module.Args(**LAYOUT, runs_dir=str(tmp_path))
    run = running.Run(args, module.__name__)  # a run folder stopped before its first evaluation
    run.close()
    with pytest.raises(SystemExit, match="no checkpoint yet"):
        module.main(module.Args(resume=run.dir))


@pytest.mark.parametrize("module", [gorl_fm, gorl_diffusion], ids=lambda m: m.__name__)
def test_the_stage_settings_in_the_state_are_the_ones_applied(module):
    """A stage's clip and gradient-norm clip are arrays in the training state (no recompiling):
    one compiled iteration must apply whichever values the state carries."""
    env = FakeEnv()
    args = module.resolve(module.Args(**{**LAYOUT, "num_epochs": 4}, critic_hidden=(16,), encoder_hidden=(16,),
                                      decoder_hidden=(16,), learning_rate=(1e-2,)))
    optimizer = optax.scale_by_adam()
    state = gorl_state(module, args, env, optimizer, optimizer.init)
    iteration = jax.jit(module.make_train_iteration(env, optimizer, args))
    free = {"learning_rate": jnp.float32(1e-2), "clip_eps": jnp.float32(10.0), "max_grad_norm": jnp.float32(1e6),
            "kl_beta": jnp.float32(0.0), "ent_coef": jnp.float32(0.01), "normalizer_before": jnp.float32(0.0),
            "normalizer_keep_variance": jnp.float32(1.0)}

    def run(**hp):
        after, metrics = iteration(state._replace(hp={**free, **hp}), jax.random.PRNGKey(2))
        moved = max(float(jnp.abs(a - b).max()) for a, b in
                    zip(jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(after.params["encoder"])))
        return moved, float(metrics["encoder/clip_fraction"])

    moved_free, clipped_free = run()
    moved_tiny_norm, _ = run(max_grad_norm=jnp.float32(1e-12))
    _, clipped_tight = run(clip_eps=jnp.float32(1e-4))
    moved_no_lr, _ = run(learning_rate=jnp.float32(0.0))
    assert moved_free > 1e-3 and moved_tiny_norm < 1e-2 * moved_free  # Adam moves ~lr per step unless the norm clip bites
    assert clipped_free == 0.0 and clipped_tight > 0.1
    assert moved_no_lr == 0.0  # the stage's learning rate is the one the state carries


def test_fresh_start_states_is_every_scripts_default():
    """A documented departure from the release (README table, "start states"): start states are
    redrawn at every iteration unless --no-fresh-start-states."""
    import gorl_sac

    assert all(m.Args().fresh_start_states is True for m in (ppo, fpo, dppo, gorl_fm, gorl_diffusion, gorl_sac))


def refinement_state(module, env, args):
    k_enc, k_dec = jax.random.split(KEY)
    obs, act = env.observation_size, env.action_size
    return module.TrainState(
        params={"encoder": module.init_encoder(k_enc, obs, act, args)}, norm=common.normalizer_init(obs),
        decoder=module.init_decoder(k_dec, obs, act, args), decoder_norm=common.normalizer_init(obs),
        **({} if module.__name__ == "gorl_sac" else dict(opt_state=None, hp=None, env_state=None)),
    )


@pytest.mark.parametrize("algo,refine", [
    ("gorl_fm", dict(refine_episodes=6)),                   # one batched rollout (the default)
    ("gorl_fm", dict(refine_episodes=6, refine_envs=2)),    # three batches of two
    ("gorl_diffusion", dict(refine_episodes=6)),
    ("gorl_diffusion", dict(refine_episodes=6, refine_envs=3)),
    ("gorl_sac", dict(refine_envs=2, refine_iterations=3)),
])
def test_refinement_episodes_start_from_distinct_fresh_states(algo, refine):
    """N refinement episodes come from N distinct start states, whatever the batching: a batch
    of E environments running several episodes each would restart them from the E states the
    auto-reset cached. Every episode is whole: its first step is a reset, its last the time limit."""
    import gorl_sac

    module = {"gorl_fm": gorl_fm, "gorl_diffusion": gorl_diffusion, "gorl_sac": gorl_sac}[algo]
    env = FakeEnv(episode_length=common.EPISODE_LENGTH)
    small = dict(encoder_hidden=(8,), decoder_hidden=(8,))
    if algo == "gorl_sac":
        args = module.Args(env_name="CartpoleBalance", **small, **refine)
    else:
        args = module.resolve(module.Args(**LAYOUT, **small, **refine))
    collect = module.make_refinement(env, args)[0]
    dataset, collect_return = collect(refinement_state(module, env, args), jax.random.PRNGKey(3))
    obs = np.asarray(dataset["obs"])
    if algo == "gorl_sac":  # flattened to transitions, [T, episodes] row-major
        obs = obs.reshape(common.EPISODE_LENGTH, 6, -1)
    assert obs.shape[:2] == (common.EPISODE_LENGTH, 6)
    starts = obs[0]
    distances = np.abs(starts[:, None] - starts[None]).sum(-1) + np.eye(6)
    assert distances.min() > 1e-3, "two refinement episodes share a start state"
    # No episode restarts inside the collection: the fake task contracts obs by 0.9 a step, so
    # after the first step no observation returns to its episode's start.
    assert np.abs(obs[1:] - starts[None]).sum(-1).min() > 1e-3
    assert np.isfinite(float(collect_return))
