"""Does GoRL represent a two-mode action distribution where Gaussian PPO cannot? A pure-JAX check.

The task, `TwoModeBandit`: one-step episodes. The observation is 4 numbers of noise (the reward
does not depend on it); the environment receives tanh(a) for a 2-D pre-squash action a, and pays

    r(tanh a) = max_k exp(-|tanh a - m_k|^2 / (2 w^2)),   m_1 = (+0.6, +0.6), m_2 = (-0.6, -0.6), w = 0.2

so the best actions form two separated modes of equal value and the straight line between them
is a low-reward gap (r at the midpoint (0, 0) is exp(-9) ~ 1e-4). The environment has the
interface of `common.make_env`'s environments (batched `reset(keys)`, `step(state,
pre_squash_action)`, auto-reset, `info["truncation"/"next_obs"/"episode_metrics"]`), so the
training iterations of gorl_fm.py and ppo.py run on it unchanged.

Both methods train with the same budget and PPO sizes: GoRL-FM through gorl_fm.py's own pieces
(init_encoder, make_train_iteration, make_refinement, stage_hyperparameters, sample_actions),
in the stage loop of its `main()` (encoder reset to the prior each stage, refinement from prior
latents between stages); Gaussian PPO through ppo.py's pieces. At the end of each GoRL stage and at
the same steps of PPO, 10,000 actions are sampled at one fixed state (the zero observation, the
mean of the observation noise) and counted:

    mode +    |a - m_1| < 0.3          mode -    |a - m_2| < 0.3
    gap       |a - (m_1 + m_2)/2| < 0.3 (the low-reward middle)

A method that represents both modes puts a large share in each mode and little in the gap; a
unimodal Gaussian either commits to one mode or straddles both with mass in the gap.

    python benchmarks/multimodal.py                      # 3 seeds, ~3 min each on one CPU core
    python benchmarks/multimodal.py --seeds 1 2 3 4 5 --stage-steps 100000 100000 50000 50000

Writes benchmarks/results/multimodal.md (the table) and multimodal_density.png (PC1 densities,
paper Fig. 6 style, plus a 2-D scatter of the final samples over the reward's contours).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import gorl_fm  # noqa: E402
import plot  # noqa: E402
import ppo  # noqa: E402

MODES = np.array([[0.6, 0.6], [-0.6, -0.6]], np.float32)
WIDTH = 0.2
RADIUS = 0.3


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["obs", "reward", "done", "info", "key"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BanditState:
    obs: jax.Array
    reward: jax.Array
    done: jax.Array
    info: dict
    key: jax.Array

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def two_mode_reward(action: jax.Array, modes=MODES, width: float = WIDTH) -> jax.Array:
    """r(a) = max_k exp(-|a - m_k|^2 / (2 w^2)) for environment actions a in [-1, 1]^d."""
    d2 = jnp.sum((action[..., None, :] - jnp.asarray(modes)) ** 2, axis=-1)
    return jnp.exp(-d2.min(axis=-1) / (2 * width**2))


class TwoModeBandit:
    """One-step episodes with a two-mode reward; `common.make_env`'s interface (batched, auto-reset)."""

    observation_size = 4
    action_size = 2
    episode_length = common.EPISODE_LENGTH  # the refinement collects blocks of this many steps per environment

    def _new_episode(self, keys):
        keys, k_obs = jax.vmap(jax.random.split, out_axes=1)(keys)
        obs = jax.vmap(lambda k: jax.random.normal(k, (self.observation_size,)))(k_obs)
        return obs, keys

    def reset(self, keys):
        obs, keys = self._new_episode(keys)
        zeros = jnp.zeros(obs.shape[0])
        info = {"truncation": zeros, "next_obs": obs, "episode_metrics": {"sum_reward": zeros}}
        return BanditState(obs=obs, reward=zeros, done=zeros, info=info, key=keys)

    def step(self, state, action):
        reward = two_mode_reward(jnp.tanh(action))
        obs, keys = self._new_episode(state.key)  # every step ends an episode: auto-reset
        info = {"truncation": jnp.zeros_like(reward), "next_obs": state.obs,  # terminal: unused
                "episode_metrics": {"sum_reward": reward}}
        return BanditState(obs=obs, reward=reward, done=jnp.ones_like(reward), info=info, key=keys)


def region_fractions(actions: np.ndarray) -> dict[str, float]:
    """Shares of environment actions near each mode, in the gap between them, and the mean reward."""
    a = np.asarray(actions)
    near = lambda c: float(np.mean(np.linalg.norm(a - c, axis=-1) < RADIUS))  # noqa: E731
    return {"mode+": near(MODES[0]), "mode-": near(MODES[1]), "gap": near(MODES.mean(axis=0)),
            "reward": float(np.mean(np.asarray(two_mode_reward(jnp.asarray(a)))))}


# ---------------------------------------------------------------------------------------------
# Training: GoRL-FM's stage loop and Gaussian PPO, on the bandit
# ---------------------------------------------------------------------------------------------

FIXED_OBS = jnp.zeros(TwoModeBandit.observation_size)


def shared_sizes(ns) -> dict:
    return dict(num_envs=ns.num_envs, unroll_length=ns.unroll_length, batch_size=ns.batch_size,
                num_minibatches=ns.num_minibatches, num_epochs=ns.num_epochs)


def build_gorl(ns, env) -> dict:
    """gorl_fm's Args and jitted pieces for the bandit, built once for every seed."""
    args = gorl_fm.resolve(gorl_fm.Args(
        **shared_sizes(ns), env_name="CartpoleBalance", stage_steps=tuple(ns.stage_steps),
        refine_envs=ns.refine_envs, refine_episodes=ns.refine_envs, refine_batch_size=ns.refine_batch_size,
        refine_steps=ns.refine_steps, refine_val_size=8192))
    optimizer = optax.scale_by_adam()  # gorl_fm.main's: the stage's learning rate scales the steps
    collect, fit = gorl_fm.make_refinement(env, args)
    return {"args": args, "optimizer": optimizer, "collect": collect, "fit": fit,
            "train_iteration": jax.jit(gorl_fm.make_train_iteration(env, optimizer, args), donate_argnums=0)}


def train_gorl(ns, seed: int, env, built: dict):
    """gorl_fm.main's stage loop. Returns per-stage rows (step, fractions) of the policy's actions,
    the samples, and the rows of the decoder fed prior latents."""
    args, optimizer, collect, fit = built["args"], built["optimizer"], built["collect"], built["fit"]
    train_iteration = built["train_iteration"]
    per_iter = gorl_fm.steps_per_iteration(args)
    state, key = jax.jit(lambda key: gorl_fm.init_state(env, args, key))(jax.random.PRNGKey(seed))
    step, rows, samples, prior_rows = 0, [], {}, []
    for stage in range(len(args.stage_steps)):
        if stage > 0:
            key, k_collect, k_fit = jax.random.split(key, 3)
            dataset, _ = collect(state, k_collect)
            decoder, decoder_norm, _ = fit(state.decoder, dataset, k_fit)
            state = state._replace(decoder=decoder, decoder_norm=decoder_norm)
        key, k_encoder = jax.random.split(key)
        state = gorl_fm.start_stage(state, k_encoder, gorl_fm.stage_hyperparameters(args, stage), optimizer, env, args)
        for _ in range(gorl_fm.iterations_in_stage(args, stage)):
            key, k_iter = jax.random.split(key)
            state, _ = train_iteration(state, k_iter)
            step += per_iter
        key, k_sample = jax.random.split(key)
        ckpt = {k: getattr(state, k) for k in gorl_fm.STAGE_KEYS}
        actions = np.asarray(gorl_fm.sample_actions(ckpt, FIXED_OBS, k_sample, ns.num_samples, args.flow_steps))
        samples[f"S{stage}"] = actions
        rows.append({"stage": f"S{stage}", "step": step, **region_fractions(actions)})
        # The decoder alone: latents from the prior N(0, I) instead of the encoder.
        prior = gorl_fm.sample_actions(ckpt, FIXED_OBS, k_sample, ns.num_samples, args.flow_steps, from_prior=True)
        prior_rows.append({"stage": f"S{stage}", "step": step, **region_fractions(np.asarray(prior))})
    return rows, samples, prior_rows


def build_ppo(ns, env, total_steps: int) -> dict:
    args = ppo.resolve(ppo.Args(**shared_sizes(ns), total_timesteps=total_steps))
    optimizer = optax.adam(args.learning_rate)  # ppo.main: no gradient clipping by default
    return {"args": args, "optimizer": optimizer,
            "train_iteration": jax.jit(ppo.make_train_iteration(env, optimizer, args), donate_argnums=0)}


def train_ppo(ns, seed: int, env, report_steps: list[int], built: dict) -> tuple[list[dict], dict]:
    """ppo.py's iteration; samples taken when the step count reaches each of `report_steps`."""
    args, optimizer, train_iteration = built["args"], built["optimizer"], built["train_iteration"]
    per_iter = ppo.steps_per_iteration(args)
    key = jax.random.PRNGKey(seed)
    key, k_init, k_env = jax.random.split(key, 3)
    params = ppo.init_params(k_init, env.observation_size, env.action_size, args)
    state = ppo.TrainState(params, optimizer.init(params), common.normalizer_init(env.observation_size),
                           jax.jit(env.reset)(jax.random.split(k_env, args.num_envs)))
    step, rows, samples = 0, [], {}
    for i, target in enumerate(report_steps):
        while step + per_iter <= target:
            key, k_iter = jax.random.split(key)
            state, _ = train_iteration(state, k_iter)
            step += per_iter
        params, _, norm, _ = state
        key, k_sample = jax.random.split(key)
        obs = jnp.broadcast_to(FIXED_OBS, (ns.num_samples, FIXED_OBS.shape[0]))
        mean, scale = ppo.actor(params["actor"], common.normalize(norm, obs))
        actions = np.asarray(jnp.tanh(mean + scale * jax.random.normal(k_sample, mean.shape)))
        samples[f"S{i}"] = actions
        rows.append({"stage": f"S{i}", "step": step, **region_fractions(actions)})
    return rows, samples


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["| method | seed | at (stage end) | step | mode + | mode - | gap | other | mean reward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, per_seed in results.items():
        for seed, rows in per_seed.items():
            for r in rows:
                other = 1 - r["mode+"] - r["mode-"] - r["gap"]
                lines.append(f"| {method} | {seed} | {r['stage']} | {r['step']:,} | {r['mode+']:.3f} | "
                             f"{r['mode-']:.3f} | {r['gap']:.3f} | {other:.3f} | {r['reward']:.3f} |")
    lines += ["", "Final samples, mean over seeds (minor mode = the less-visited of the two):", "",
              "| method | major mode | minor mode | gap | mean reward |", "|---|---|---|---|---|"]
    for method, per_seed in results.items():
        finals = [rows[-1] for rows in per_seed.values()]
        major = np.mean([max(r["mode+"], r["mode-"]) for r in finals])
        minor = np.mean([min(r["mode+"], r["mode-"]) for r in finals])
        gap = np.mean([r["gap"] for r in finals])
        reward = np.mean([r["reward"] for r in finals])
        lines.append(f"| {method} | {major:.3f} | {minor:.3f} | {gap:.3f} | {reward:.3f} |")
    return "\n".join(lines)


def figure(samples: dict, out: str, bw_factor: float = 0.8) -> None:
    """Per method: KDE on a common PC1 (fitted on every sample drawn) at each stage end; plus a
    2-D scatter of the final samples over the reward's contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = np.concatenate([s for per_stage in samples.values() for s in per_stage.values()])
    mean, axis = plot.pca_direction(pooled)
    grid = np.linspace(-2.0, 2.0, 400)
    fig, axes = plt.subplots(1, len(samples) + 1, figsize=(5 * (len(samples) + 1), 4))
    for ax, (method, per_stage) in zip(axes, samples.items()):
        for label, s in per_stage.items():
            ax.plot(grid, plot.kde((s - mean) @ axis, grid, bw_factor), label=label)
        for m in MODES:
            ax.axvline((m - mean) @ axis, color="k", linestyle=":", alpha=0.6)
        ax.set_title(f"{method}: actions at one state, first seed")
        ax.set_xlabel("PC1 (common axis; dotted: the two reward modes)")
        ax.set_ylabel(f"density (KDE, bandwidth factor {bw_factor})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    u = np.linspace(-1, 1, 200)
    xx, yy = np.meshgrid(u, u)
    rr = np.asarray(two_mode_reward(jnp.asarray(np.stack([xx, yy], -1))))
    ax.contour(xx, yy, rr, levels=[0.1, 0.5, 0.9], colors="gray", linewidths=0.8)
    for method, per_stage in samples.items():
        final = list(per_stage.values())[-1][:2000]
        ax.scatter(final[:, 0], final[:, 1], s=2, alpha=0.3, label=f"{method} (final)")
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_aspect("equal")
    ax.set_title("final samples; reward contours 0.1/0.5/0.9")
    ax.legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="GoRL-FM vs Gaussian PPO on a two-mode one-step task")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--stage-steps", type=int, nargs="+", default=[40_960, 40_960, 20_480, 20_480],
                   help="GoRL stage budgets (paper's 2:2:1:1); PPO gets their sum")
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--unroll-length", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--refine-envs", type=int, default=16, help="x 1000 one-step episodes per refinement")
    p.add_argument("--refine-batch-size", type=int, default=1000)
    p.add_argument("--refine-steps", type=int, default=800, help="decoder gradient steps per refinement")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--out-dir", default="benchmarks/results")
    ns = p.parse_args(argv)

    env = TwoModeBandit()
    results, first_samples = {"GoRL-FM": {}, "PPO": {}, "GoRL-FM decoder, z ~ N(0, I)": {}}, {}
    t0 = time.time()
    gorl_built = ppo_built = None
    for seed in ns.seeds:
        gorl_built = gorl_built or build_gorl(ns, env)
        rows, samples, prior_rows = train_gorl(ns, seed, env, gorl_built)
        results["GoRL-FM"][seed] = rows
        results["GoRL-FM decoder, z ~ N(0, I)"][seed] = prior_rows
        first_samples.setdefault("GoRL-FM", samples)
        report_steps = [r["step"] for r in rows]
        ppo_built = ppo_built or build_ppo(ns, env, report_steps[-1])
        rows_ppo, samples_ppo = train_ppo(ns, seed, env, report_steps, ppo_built)
        results["PPO"][seed] = rows_ppo
        first_samples.setdefault("PPO", samples_ppo)
        print(f"seed {seed}: GoRL final {rows[-1]}, PPO final {rows_ppo[-1]} ({time.time() - t0:.0f}s)", flush=True)
    text = table(results)
    print(text)
    os.makedirs(ns.out_dir, exist_ok=True)
    with open(os.path.join(ns.out_dir, "multimodal.md"), "w") as f:
        f.write(f"# GoRL-FM vs Gaussian PPO on TwoModeBandit\n\n`{' '.join(sys.argv)}`\n\n{text}\n")
    figure(first_samples, os.path.join(ns.out_dir, "multimodal_density.png"))


if __name__ == "__main__":
    main()
