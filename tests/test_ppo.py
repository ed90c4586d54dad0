"""Tests of ppo.py: the loss, flag validation and --help, and a small end-to-end run + resume."""

import ast
import csv
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import running
import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

LOSS_KEYS = {"loss/total", "loss/policy", "loss/value", "policy/entropy", "policy/clip_fraction", "policy/approx_kl",
             "critic/explained_variance"}


def random_batch(params, key, n=64, obs_size=5):
    """A batch whose actions and log-probabilities come from the policy at `params`."""
    k_obs, k_act, k_adv, k_target = jax.random.split(key, 4)
    obs = jax.random.normal(k_obs, (n, obs_size))
    mean, scale = ppo.actor(params["actor"], obs)
    action = mean + scale * jax.random.normal(k_act, mean.shape)
    return {
        "obs": obs,
        "action": action,
        "log_prob": common.gaussian_log_prob(action, mean, scale),
        "advantage": jax.random.normal(k_adv, (n,)) * 3 + 1,
        "target": jax.random.normal(k_target, (n,)),
    }


def test_ppo_loss_at_the_rollout_parameters():
    args = ppo.resolve(ppo.Args(actor_hidden=(16, 16), critic_hidden=(16, 16)))
    params = ppo.init_params(jax.random.PRNGKey(0), 5, 2, args)
    batch = random_batch(params, jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    loss_and_grad = jax.jit(lambda p, b: jax.value_and_grad(ppo.ppo_loss, has_aux=True)(p, b, key, args))
    (loss, metrics), grads = loss_and_grad(params, batch)
    assert set(metrics) == LOSS_KEYS
    assert loss.shape == () and all(v.shape == () for v in metrics.values())
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Ratio 1 everywhere: nothing clipped, and the surrogate is minus the mean normalized advantage (0).
    assert float(metrics["policy/clip_fraction"]) == 0.0 and float(metrics["policy/approx_kl"]) == 0.0
    assert float(metrics["loss/policy"]) == pytest.approx(0.0, abs=1e-5)
    # The parts add up as documented.
    values = ppo.critic(params["critic"], batch["obs"])
    assert values.shape == (64,)
    assert float(metrics["loss/value"]) == pytest.approx(float(jnp.mean((values - batch["target"]) ** 2)), rel=1e-5)
    mean, scale = ppo.actor(params["actor"], batch["obs"])
    assert args.entropy == "tanh"
    expected = ppo.entropy_estimate(mean, scale, key, "tanh").mean()  # the loss's key draws the sample
    assert float(metrics["policy/entropy"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) != pytest.approx(float(common.gaussian_entropy(scale).mean()), rel=1e-3)
    total = metrics["loss/policy"] + args.vf_coef * metrics["loss/value"] - args.ent_coef * metrics["policy/entropy"]
    assert float(loss) == float(metrics["loss/total"]) == pytest.approx(float(total), rel=1e-5, abs=1e-6)


def test_ppo_loss_clips_away_from_the_rollout_parameters():
    args = ppo.resolve(ppo.Args(actor_hidden=(16, 16), critic_hidden=(16, 16)))
    params = ppo.init_params(jax.random.PRNGKey(0), 5, 2, args)
    batch = random_batch(params, jax.random.PRNGKey(1))
    batch["log_prob"] = batch["log_prob"] + jnp.where(jnp.arange(64) % 2 == 0, 1.0, 0.0)  # ratio e^-1 on half
    _, metrics = ppo.ppo_loss(params, batch, jax.random.PRNGKey(2), args)
    assert float(metrics["policy/clip_fraction"]) == pytest.approx(0.5)


@pytest.mark.parametrize("gae_form", ["standard", "release"])
def test_advantages_per_minibatch_are_gae_of_the_sequences_with_the_current_critic(gae_form):
    """The loss with --advantages minibatch equals the loss given advantages and targets that a
    plain loop computed on the same [sequence, step] minibatch with the same critic."""
    from test_common import gae_reference

    B, L = 6, 10
    args = ppo.resolve(ppo.Args(actor_hidden=(8,), critic_hidden=(8,), gae_form=gae_form, unroll_length=L))
    params = ppo.init_params(jax.random.PRNGKey(0), 5, 2, args)
    flat = lambda tree: jax.tree.map(lambda x: jnp.reshape(x, (B * L, *np.shape(x)[2:])), tree)  # noqa: E731
    batch = jax.tree.map(lambda x: x.reshape(B, L, *x.shape[1:]), random_batch(params, jax.random.PRNGKey(1), n=B * L))
    rng = np.random.default_rng(0)
    termination = (rng.random((B, L)) < 0.1).astype(np.float32)
    truncation = ((rng.random((B, L)) < 0.1) * (1 - termination)).astype(np.float32)
    assert termination.sum() > 0 and truncation.sum() > 0
    sequences = dict(batch, next_obs=jax.random.normal(jax.random.PRNGKey(3), batch["obs"].shape),
                     reward=rng.normal(size=(B, L)).astype(np.float32), termination=termination,
                     truncation=truncation, episode_done=np.maximum(termination, truncation))
    key = jax.random.PRNGKey(4)
    # Minibatches of sequences reach the loss flattened to [sequences * steps, ...].
    _, got = ppo.ppo_loss(params, flat(sequences), key, dataclasses.replace(args, advantages="minibatch"))

    values = np.asarray(ppo.critic(params["critic"], batch["obs"])).T  # time-major [L, B]
    next_values = np.asarray(ppo.critic(params["critic"], sequences["next_obs"])).T
    rewards = args.reward_scaling * sequences["reward"].T
    if gae_form == "standard":
        advantage = gae_reference(rewards, values, next_values, termination.T, sequences["episode_done"].T,
                                  args.discount, args.gae_lambda)
        target = advantage + values
    else:  # Brax's: V(s_t+1) read from the next row (the true last observation's at the end),
        # truncated steps left out, one-step advantage on the lambda-return targets
        next_values = np.concatenate([values[1:], next_values[-1:]])
        target, following = np.zeros_like(values), np.zeros(B)
        for t in reversed(range(L)):
            keep = 1 - truncation.T[t]
            delta = (rewards[t] + args.discount * (1 - termination.T[t]) * next_values[t] - values[t]) * keep
            following = delta + args.discount * args.gae_lambda * (1 - termination.T[t]) * keep * following
            target[t] = following + values[t]
        next_target = np.concatenate([target[1:], next_values[-1:]])
        advantage = (rewards + args.discount * (1 - termination.T) * next_target - values) * (1 - truncation.T)
    _, want = ppo.ppo_loss(params, flat(dict(batch, advantage=advantage.T, target=target.T)), key, args)
    for name in LOSS_KEYS:
        assert float(got[name]) == pytest.approx(float(want[name]), rel=1e-4, abs=1e-5), name


def test_value_loss_is_a_quarter_of_the_mean_squared_error():
    args = ppo.resolve(ppo.Args(actor_hidden=(8,), critic_hidden=(8,)))
    params = ppo.init_params(jax.random.PRNGKey(0), 5, 2, args)
    batch = random_batch(params, jax.random.PRNGKey(1), n=4)
    values = ppo.critic(params["critic"], batch["obs"])
    batch["target"] = values - jnp.array([1.0, -2.0, 3.0, 0.0])  # squared errors 1, 4, 9, 0: MSE 3.5
    key = jax.random.PRNGKey(3)
    loss, metrics = ppo.ppo_loss(params, batch, key, args)
    loss_without_value, _ = ppo.ppo_loss(params, batch, key, dataclasses.replace(args, vf_coef=0.0))
    assert args.vf_coef == 0.25
    assert float(metrics["loss/value"]) == pytest.approx(3.5, rel=1e-5)
    assert float(loss - loss_without_value) == pytest.approx(0.25 * 3.5, rel=1e-4)


# (mean, scale) of one action dimension; the last one saturates tanh on most of its mass.
ENTROPY_CASES = [(0.0, 1.0), (0.5, 0.3), (-1.0, 0.1), (2.0, 1.5)]


@pytest.mark.parametrize("mean,scale", ENTROPY_CASES)
def test_tanh_entropy_estimate_is_the_entropy_of_the_squashed_action(mean, scale):
    """E over keys of the one-sample estimate = -E[log p_Y(y)] for y = tanh(u), u ~ N(mean, scale^2),
    with p_Y(y) = N(u; mean, scale) / (1 - tanh(u)^2), estimated independently in float64."""
    n = 200_000
    means, scales = jnp.full((n, 1), mean), jnp.full((n, 1), scale)
    estimates = np.asarray(ppo.entropy_estimate(means, scales, jax.random.PRNGKey(0), "tanh"), np.float64)
    assert estimates.shape == (n,)  # one independent sample per state
    u = np.random.default_rng(1).normal(mean, scale, n)
    log_p_u = -0.5 * ((u - mean) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    minus_log_p_y = -(log_p_u - np.log(1.0 - np.tanh(u) ** 2))
    assert np.all(np.isfinite(estimates)) and np.all(np.isfinite(minus_log_p_y))
    error = 5 * np.sqrt(estimates.var() / n + minus_log_p_y.var() / n)
    assert estimates.mean() == pytest.approx(minus_log_p_y.mean(), abs=error)
    gaussian = float(common.gaussian_entropy(jnp.array([scale])))
    assert float(ppo.entropy_estimate(jnp.array([[mean]]), jnp.array([[scale]]), None, "gaussian")[0]) == pytest.approx(gaussian)
    if abs(mean) >= 1 or scale >= 1:  # away from the linear part of tanh the squash matters
        assert abs(estimates.mean() - gaussian) > 0.5 and abs(estimates.mean() - gaussian) > 10 * error


def test_tanh_entropy_estimate_is_reparameterized_and_keyed():
    mean, scale = jnp.array([[1.5, -0.5]]), jnp.array([[0.8, 0.4]])
    h = lambda m, s, k: ppo.entropy_estimate(m, s, k, "tanh").sum()  # noqa: E731
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert float(h(mean, scale, k1)) != float(h(mean, scale, k2))
    assert float(h(mean, scale, k1)) == float(h(mean, scale, k1))
    # The sample is mean + scale * eps, so the estimate depends on the mean (the Gaussian one does not).
    assert np.all(np.abs(np.asarray(jax.grad(h)(mean, scale, k1))) > 1e-3)
    g = jax.grad(lambda m: ppo.entropy_estimate(m, scale, None, "gaussian").sum())(mean)
    assert np.all(np.asarray(g) == 0.0)


def test_stochastic_evaluation_samples_the_policy():
    args = ppo.resolve(ppo.Args(actor_hidden=(8,), critic_hidden=(8,)))
    params = ppo.init_params(jax.random.PRNGKey(0), 5, 2, args)
    norm = common.normalizer_init(5)
    obs = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    mean, scale = ppo.actor(params["actor"], obs)
    k1, k2 = jax.random.PRNGKey(2), jax.random.PRNGKey(3)
    np.testing.assert_array_equal(ppo.act(params, norm, obs, k1, True), mean)
    np.testing.assert_array_equal(ppo.act(params, norm, obs, k2, True), mean)
    a1, a2 = ppo.act(params, norm, obs, k1, False), ppo.act(params, norm, obs, k2, False)
    assert not np.allclose(a1, a2) and not np.allclose(a1, mean)
    np.testing.assert_allclose(a1, mean + scale * jax.random.normal(k1, mean.shape), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Defaults: the newest release's values (configs/methods/ppo.toml, dm_control profile), per task
# ---------------------------------------------------------------------------------------------

RELEASED_DEFAULTS = {
    "env_name": "HopperStand",
    "learning_rate": 3e-4,
    "clip_eps": 0.1,
    "ent_coef": 0.01,
    "vf_coef": 0.25,
    "discount": 0.995,
    "gae_lambda": 0.95,
    "reward_scaling": 10.0,
    "max_grad_norm": 0.0,
    "num_envs": 2048,
    "batch_size": 1024,
    "num_minibatches": 32,
    "unroll_length": 30,
    "num_epochs": 16,
    "total_timesteps": 180_000_000,
    "eval_every": 6_000_000,
    "num_eval_envs": 128,
    "deterministic_eval": True,
    "actor_hidden": (32, 32, 32, 32),
    "critic_hidden": (256, 256, 256, 256, 256),
    "entropy": "tanh",
    "normalizer_update": "after",
    "advantages": "rollout",
    "minibatch_unit": "transition",
    "gae_form": "standard",
    "impl": "jax",
}


@pytest.mark.parametrize("name", list(RELEASED_DEFAULTS))
def test_defaults_are_the_released_values(name):
    assert getattr(ppo.resolve(ppo.Args()), name) == RELEASED_DEFAULTS[name]


def test_task_dependent_flags_default_to_none_and_resolve_per_task():
    assert set(ppo.TASK_DEFAULTS) == {"learning_rate", "clip_eps", "discount", "max_grad_norm", "deterministic_eval",
                                      "matmul_precision"}
    assert all(getattr(ppo.Args(), name) is None for name in ppo.TASK_DEFAULTS)
    cases = {
        "CartpoleBalance": dict(discount=0.995, learning_rate=3e-4, clip_eps=0.1, deterministic_eval=True),
        "FingerSpin": dict(discount=0.95, learning_rate=3e-4, clip_eps=0.1, deterministic_eval=True),
        "BallInCup": dict(discount=0.95),
        "HumanoidRun": dict(discount=0.995, learning_rate=1e-3, clip_eps=0.3, deterministic_eval=False, max_grad_norm=0.0),
        "HumanoidStand": dict(learning_rate=1e-3, clip_eps=0.3, deterministic_eval=False),
    }
    for task, expected in cases.items():
        resolved = ppo.resolve(ppo.Args(env_name=task))
        assert {k: getattr(resolved, k) for k in expected} == expected, task
        assert all(getattr(resolved, name) is not None for name in ppo.TASK_DEFAULTS)
        ppo.validate(resolved)
    # A flag given on the command line wins over the task's value.
    import tyro

    args = tyro.cli(ppo.Args, args=["--env-name", "FingerSpin", "--discount", "0.9"])
    assert ppo.resolve(args).discount == 0.9 and ppo.resolve(args).learning_rate == 3e-4
    args = tyro.cli(ppo.Args, args=["--env-name", "HumanoidRun", "--deterministic-eval", "True", "--clip-eps", "0.2"])
    resolved = ppo.resolve(args)
    assert resolved.deterministic_eval is True and resolved.clip_eps == 0.2 and resolved.learning_rate == 1e-3
    assert ppo.resolve(resolved) == resolved  # idempotent


# ---------------------------------------------------------------------------------------------
# Command line: validation before compiling, --help
# ---------------------------------------------------------------------------------------------

BAD_FLAGS = {
    "unknown task": (["--env-name", "NoSuchTask"], ["NoSuchTask", "CartpoleBalance", "HopperStand"]),
    "batch does not divide": (["--batch-size", "1000"], ["--batch-size", "--num-envs", "multiple"]),
    "budget below one iteration": (["--total-timesteps", "1000"], ["--total-timesteps", "less than one iteration"]),
    "unknown entropy estimate": (["--entropy", "exact"], ["--entropy", "tanh", "gaussian"]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Run `ppo.py --help` and each bad-flag command at the same time (each pays the imports)."""
    runs_dir = str(tmp_path_factory.mktemp("cli_runs"))
    env = {**os.environ, "COLUMNS": "400", "JAX_PLATFORMS": "cpu"}
    commands = {"help": ["--help"]}
    commands.update({name: [*flags, "--runs-dir", runs_dir] for name, (flags, _) in BAD_FLAGS.items()})
    procs = {
        name: subprocess.Popen(
            [sys.executable, "ppo.py", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, flags in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)  # generous: CI machines can be loaded
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    return results, runs_dir


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_exit_with_a_message_before_compiling(cli, case):
    results, runs_dir = cli
    returncode, out, err = results[case]
    assert returncode not in (0, None, -9), (returncode, out, err)
    assert "Traceback" not in err
    for needle in BAD_FLAGS[case][1]:
        assert needle in err, (needle, err)
    assert os.listdir(runs_dir) == []  # stopped before creating a run folder (or compiling anything)


def test_validate_accepts_the_defaults_and_reports_every_problem():
    ppo.validate(ppo.Args())
    assert ppo.steps_per_iteration(ppo.Args()) == 983_040
    with pytest.raises(SystemExit) as error:
        ppo.validate(ppo.Args(batch_size=1000, total_timesteps=10, episode_length=0))
    message = str(error.value)
    assert "--batch-size" in message and "--total-timesteps" in message and "--episode-length" in message
    # The task name is checked where the task is loaded (a script given its own environment never is).
    with pytest.raises(SystemExit, match="unknown task 'NoSuchTask'[\\s\\S]*CartpoleBalance[\\s\\S]*Go1Getup"):
        ppo.make_env(ppo.Args(env_name="NoSuchTask"))


def args_docstrings():
    """{field: docstring} from the source of `ppo.Args` and of the flags it inherits,
    `running.RunFlags` (the string literal under each field)."""
    docs = {}
    for path, name in (("running.py", "RunFlags"), ("ppo.py", "Args")):
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
        for node, following in zip(cls.body, cls.body[1:] + [None]):
            if isinstance(node, ast.AnnAssign):
                is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                docs[node.target.id] = following.value.value if is_doc else None
    return docs


def test_every_args_field_has_a_one_line_docstring_shown_by_help(cli):
    docs = args_docstrings()
    assert set(docs) == {f.name for f in dataclasses.fields(ppo.Args)}
    returncode, out, err = cli[0]["help"]
    assert returncode == 0, err
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())  # tolerate line wrapping and boxes
    for name, doc in docs.items():
        assert doc and "\n" not in doc.strip(), f"Args.{name} needs a one-line docstring"
        assert f"--{name.replace('_', '-')}" in flat, name
        assert " ".join(doc.split()) in flat, (name, doc)


# ---------------------------------------------------------------------------------------------
# End to end: two iterations, then resume to three
# ---------------------------------------------------------------------------------------------

SMALL = dict(
    env_name="CartpoleBalance",
    num_envs=16,
    batch_size=16,
    num_minibatches=2,
    unroll_length=10,
    num_epochs=2,
    num_eval_envs=4,
)
ITERATION = 16 * 2 * 10  # batch_size * num_minibatches * unroll_length environment steps


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    args = ppo.Args(**SMALL, total_timesteps=2 * ITERATION, eval_every=ITERATION, runs_dir=runs_dir)
    assert ppo.steps_per_iteration(args) == ITERATION
    ppo.main(args)
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*"))
    return run_dir


@pytest.mark.slow
def test_run_folder_contents(first_run):
    run_dir = first_run
    assert os.path.basename(run_dir).startswith("CartpoleBalance__ppo__1__")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["algo"] == "ppo" and config["total_timesteps"] == 2 * ITERATION
    assert config["num_envs"] == 16 and config["actor_hidden"] == [32, 32, 32, 32]
    # The task-dependent flags are recorded as resolved for CartpoleBalance.
    assert {k: config[k] for k in ppo.TASK_DEFAULTS} == {
        "learning_rate": 3e-4, "clip_eps": 0.1, "discount": 0.995, "max_grad_norm": 0.0, "deterministic_eval": True,
        "matmul_precision": "default"}
    assert config["entropy"] == "tanh" and config["normalizer_update"] == "after"

    rows = read_csv(os.path.join(run_dir, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [ITERATION, 2 * ITERATION]
    for row in rows:
        for column in ("eval/return", "eval/return_std", "loss/total", "loss/policy", "loss/value", "policy/entropy"):
            assert math.isfinite(float(row[column])), (column, row)
        assert 0 < float(row["eval/return"]) <= 1000  # CartpoleBalance: reward in [0, 1] per step
        assert float(row["eval/episode_length"]) == 1000  # no terminations in DMC: the time limit
        assert 0 <= float(row["policy/clip_fraction"]) <= 1
    assert glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))

    checkpoint = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))
    assert set(checkpoint) == {"params", "opt_state", "norm", "step", "key"}
    assert int(checkpoint["step"]) == 2 * ITERATION
    assert float(checkpoint["norm"].count) == 2 * ITERATION  # every observation of both iterations
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(checkpoint["params"]))
    assert checkpoint["params"]["actor"][0]["w"].shape == (5, 32)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(first_run):
    run_dir = first_run
    before = read_csv(os.path.join(run_dir, "metrics.csv"))
    # Ask for a third iteration, and simulate an interruption after a row that had no checkpoint.
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["total_timesteps"] = 3 * ITERATION
    with open(config_path, "w") as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, "metrics.csv"), "a", newline="") as f:
        writer = csv.DictWriter(f, list(before[0]))
        writer.writerow({**before[-1], "step": 3 * ITERATION, "loss/total": 12345.0})

    ppo.main(ppo.Args(resume=run_dir))  # every other flag comes from config.json

    assert glob.glob(os.path.join(os.path.dirname(run_dir), "*")) == [run_dir]  # no new run folder
    rows = read_csv(os.path.join(run_dir, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [ITERATION, 2 * ITERATION, 3 * ITERATION]
    for old, new in zip(before, rows):
        assert {k: new[k] for k in old} == old  # earlier rows kept as they were
    assert float(rows[-1]["loss/total"]) != 12345.0
    assert math.isfinite(float(rows[-1]["eval/return"]))
    checkpoint = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))
    assert int(checkpoint["step"]) == 3 * ITERATION
    assert float(checkpoint["norm"].count) == 3 * ITERATION  # the normalizer was restored, not reset
