"""Figures from run folders: learning curves and the action-density figure (paper 002, Fig. 6/7).

    python plot.py curves runs/CartpoleBalance__ppo__1__* runs/CartpoleBalance__gorl_fm__* --out curves.png
    python plot.py density runs/HopperStand__gorl_fm__1__... --stages 0 1 2 3 --out density.png

curves:  runs are grouped by (env_name, exp_name) from their config.json; each seed's `eval/return`
         (or --metric) is interpolated onto a common step grid and drawn as the mean over seeds
         with a band of one standard deviation (paper E.5), one panel per task. The steps where a
         GoRL run's `stage` column changes (the ends of stages 0..M-1, where the decoder is
         refined) are drawn as vertical dotted lines.
density: 10,000 actions sampled at one fixed state from the saved policy of each requested
         stage (checkpoints/stageK.npz; for ppo.py checkpoints/latest.npz), projected on their
         first principal component and smoothed with a Gaussian KDE of bandwidth factor 0.8
         (paper E.5), one curve per stage. The fixed state is "a representative stable state from
         the trained agent's trajectory": the observation after --rollout-steps steps of the
         last listed stage's policy from a reset of the run's task with --state-seed
         (--rollout-steps 0: the first observation of that reset).

This is a tool, not an algorithm file: it imports the algorithm module named by a run's config
("algo") to sample its policy. Only numpy and matplotlib draw (no seaborn / sklearn).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import math
import os
from collections import defaultdict

import numpy as np

# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_run(run_dir: str) -> dict:
    """{"dir", "config", "rows"}: config.json and metrics.csv (every value a float, NaN if empty)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    rows = []
    path = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(path):
        with open(path) as f:
            rows = [{k: _float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {"dir": run_dir, "config": config, "rows": rows}


def metric_curve(rows: list[dict], metric: str = "eval/return") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows where `metric` is finite, sorted by step."""
    pts = sorted((r["step"], r[metric]) for r in rows if math.isfinite(r.get(metric, math.nan)))
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = map(np.asarray, zip(*pts))
    return steps, values


def stage_boundaries(rows: list[dict]) -> list[float]:
    """Global steps at which the `stage` column changes: the end of every stage but the last."""
    staged = [r for r in rows if math.isfinite(r.get("stage", math.nan))]
    return [float(a["step"]) for a, b in zip(staged, staged[1:]) if b["stage"] != a["stage"]]


def mean_std_on_grid(curves: list[tuple[np.ndarray, np.ndarray]], num_points: int = 200):
    """Mean and (population) standard deviation over seeds on a common step grid.

    Each seed's curve is linearly interpolated; the grid spans the steps every seed has reached
    (from the latest first evaluation to the earliest last one), so no seed is extrapolated.
    Returns (grid, mean, std); empty arrays if no curve has a point.
    """
    curves = [(s, v) for s, v in curves if len(s)]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    lo = max(s[0] for s, _ in curves)
    hi = min(s[-1] for s, _ in curves)
    if hi < lo:  # disjoint ranges (should not happen with the same budget): use the union
        lo, hi = min(s[0] for s, _ in curves), max(s[-1] for s, _ in curves)
    all_steps = np.unique(np.concatenate([s for s, _ in curves]))
    grid = all_steps[(all_steps >= lo) & (all_steps <= hi)]
    if len(grid) < num_points and hi > lo:
        grid = np.unique(np.concatenate([grid, np.linspace(lo, hi, num_points)]))
    values = np.stack([np.interp(grid, s, v) for s, v in curves])
    return grid, values.mean(axis=0), values.std(axis=0)


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups = defaultdict(list)
    for run in runs:
        name = run["config"].get("exp_name") or run["config"].get("algo", "?")
        groups[(run["config"].get("env_name", "?"), name)].append(run)
    return dict(groups)


# ---------------------------------------------------------------------------------------------
# Learning curves
# ---------------------------------------------------------------------------------------------


def _steps_label(x, _position=None) -> str:
    """Tick labels short enough not to collide: 150k, 1.5M."""
    return f"{x / 1e6:g}M" if abs(x) >= 1e6 else (f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}")


def plot_curves(run_dirs: list[str], out: str, metric: str = "eval/return", title: str | None = None) -> str:
    """One panel per task, one mean +- std curve per algorithm, stage boundaries dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = group_runs([load_run(d) for d in run_dirs])
    envs = sorted({env for env, _ in groups})
    if not envs:
        raise ValueError("no run folders given")
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    algos = sorted({algo for _, algo in groups})
    for ax, env in zip(axes[0], envs):
        for algo in algos:
            runs = groups.get((env, algo))
            if not runs:
                continue
            color = colors[algos.index(algo) % len(colors)]
            grid, mean, std = mean_std_on_grid([metric_curve(r["rows"], metric) for r in runs])
            if len(grid) == 0:
                continue
            ax.plot(grid, mean, color=color, label=f"{algo} (n={len(runs)})")
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            for i, b in enumerate(stage_boundaries(runs[0]["rows"])):
                ax.axvline(b, color=color, linestyle=":", alpha=0.7,
                           label=f"{algo} stage ends" if i == 0 else None)
        ax.set_title(f"{env}" if title is None else f"{title}: {env}")
        ax.set_xlabel("environment steps")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_steps_label))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


# ---------------------------------------------------------------------------------------------
# Action density: PC1 projection and Gaussian KDE (paper E.5)
# ---------------------------------------------------------------------------------------------


def pca_direction(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, first principal axis) of [n, d] samples, by SVD of the centered data.

    The sign is fixed so that the axis' largest-magnitude coordinate is positive (so repeated
    calls, and the same distribution at two stages, are drawn the same way round).
    """
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axis = vt[0]
    if axis[np.argmax(np.abs(axis))] < 0:
        axis = -axis
    return mean, axis


def pca_project(samples: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
    """Coordinates of [n, d] samples on the first principal component (centered, as sklearn's
    PCA(1).fit_transform up to sign). `basis`: fit the component on these samples instead
    (e.g. the pooled samples of several stages, for one common axis)."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    mean, axis = pca_direction(x if basis is None else basis)
    return (x - mean) @ axis


def kde(x: np.ndarray, grid: np.ndarray, bw_factor: float = 0.8) -> np.ndarray:
    """1-D Gaussian kernel density estimate of samples `x` at `grid`.

    scipy.stats.gaussian_kde(x, bw_method=bw_factor) semantics: the kernel's standard deviation
    is bw_factor times the sample standard deviation (ddof=1).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    grid = np.asarray(grid, dtype=np.float64)
    h = bw_factor * x.std(ddof=1)
    if not h > 0:
        raise ValueError("kde needs samples with a positive spread")
    out = np.empty(grid.size)
    flat = grid.ravel()
    for i in range(0, flat.size, 256):  # chunks keep the [grid, n] matrix small
        u = (flat[i : i + 256, None] - x[None, :]) / h
        out[i : i + 256] = np.exp(-0.5 * u**2).sum(axis=1)
    return (out / (x.size * h * math.sqrt(2 * math.pi))).reshape(grid.shape)


def plot_density(sample_sets: dict[str, np.ndarray], out: str, bw_factor: float = 0.8,
                 shared_axis: bool = False, title: str = "action density on PC1") -> str:
    """One KDE curve per labelled [n, d] sample set (e.g. per stage), each projected on PC1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = np.concatenate([np.asarray(s).reshape(len(s), -1) for s in sample_sets.values()])
    projections = {label: pca_project(s, pooled if shared_axis else None) for label, s in sample_sets.items()}
    lo = min(p.min() for p in projections.values())
    hi = max(p.max() for p in projections.values())
    # Wide enough for the kernels' tails: three bandwidths past the extreme samples.
    pad = max(3 * bw_factor * max(p.std(ddof=1) for p in projections.values()), 0.05 * (hi - lo), 1e-3)
    grid = np.linspace(lo - pad, hi + pad, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, p in projections.items():
        density = kde(p, grid, bw_factor)
        line, = ax.plot(grid, density, label=label)
        ax.fill_between(grid, density, alpha=0.15, color=line.get_color())
    ax.set_xlabel("PC1 of sampled actions" + (" (common axis)" if shared_axis else ""))
    ax.set_ylabel(f"density (Gaussian KDE, bandwidth factor {bw_factor})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


# ---------------------------------------------------------------------------------------------
# Sampling a saved policy at one state
# ---------------------------------------------------------------------------------------------


DENSITY_ALGOS = ("ppo", "gorl_fm", "gorl_diffusion")


def load_policy(run_dir: str, stage: int | None):
    """(config, sample(obs, key, n, from_prior) -> [n, act] environment actions) of a saved policy.

    GoRL runs (config algo gorl_*): checkpoints/stage{stage}.npz through the algorithm module's
    `sample_actions`, its extra arguments (flow_steps, diffusion_steps, denoised_clip, ...)
    filled from the run's config. ppo.py runs: checkpoints/latest.npz, tanh of a Gaussian draw.
    """
    import jax
    import jax.numpy as jnp

    import common

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {run_dir} is not a run folder (no config.json)")
    with open(path) as f:
        config = json.load(f)
    algo = config.get("algo")
    if algo not in DENSITY_ALGOS or config.get("plain_sac"):
        name = config.get("exp_name") or algo
        raise SystemExit(f"error: {run_dir} is a run of {name}; density draws the policies of "
                         f"{', '.join(a + '.py' for a in DENSITY_ALGOS)} runs (a Gaussian policy or a "
                         "GoRL decoder whose sampler plot.py knows)")
    if algo == "ppo":
        import ppo

        state = common.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))

        def sample(obs, key, n, from_prior=False):
            obs = jnp.broadcast_to(obs, (n, obs.shape[-1]))
            mean, scale = ppo.actor(state["params"]["actor"], common.normalize(state["norm"], obs))
            return jnp.tanh(mean + scale * jax.random.normal(key, mean.shape))

        return config, sample
    module = importlib.import_module(algo)
    if stage is None:
        raise SystemExit("error: --stages is required for a staged (GoRL) run")
    path = os.path.join(run_dir, "checkpoints", f"stage{stage}.npz")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist (completed stages are saved as stageK.npz)")
    state = common.load_checkpoint(path)
    params = list(inspect.signature(module.sample_actions).parameters)
    extra = {p: _config_value(config[p]) for p in params[4:] if p in config}

    def sample(obs, key, n, from_prior=False):
        return module.sample_actions(state, obs, key, n, from_prior=from_prior, **extra)

    return config, sample


def _config_value(v):
    return tuple(v) if isinstance(v, list) else v


def pick_state(config: dict, sample, rollout_steps: int, state_seed: int = 0) -> np.ndarray:
    """A fixed raw observation of the run's task: reset with `state_seed`, then `rollout_steps`
    steps of the policy `sample` (the trajectory of one environment)."""
    import jax
    import jax.numpy as jnp

    import common

    env = common.make_env(config["env_name"], config.get("impl", "jax"))
    key = jax.random.PRNGKey(state_seed)
    k_reset, k_roll = jax.random.split(key)
    state = jax.jit(env.reset)(k_reset[None])
    if rollout_steps > 0:

        def step(s, k):
            a = sample(s.obs[0], k, 1)  # environment action in (-1, 1); env.step applies tanh
            return env.step(s, jnp.arctanh(jnp.clip(a, -1 + 1e-6, 1 - 1e-6))), None

        state, _ = jax.jit(lambda s, k: jax.lax.scan(step, s, jax.random.split(k, rollout_steps)))(state, k_roll)
    return np.asarray(state.obs[0])


def density_from_run(run_dir: str, stages: list[int] | None, out: str, num_samples: int = 10_000,
                     rollout_steps: int = 200, state_seed: int = 0, bw_factor: float = 0.8,
                     shared_axis: bool = False, from_prior: bool = False, sample_seed: int = 0) -> str:
    import jax
    import jax.numpy as jnp

    if not stages:
        names = os.listdir(os.path.join(run_dir, "checkpoints")) if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
        found = sorted(int(n[5:-4]) for n in names if n.startswith("stage") and n.endswith(".npz") and n[5:-4].isdigit())
        stages = found or [None]  # a GoRL run: every saved stage; otherwise the run's latest policy
    policies = [(s, *load_policy(run_dir, s)) for s in stages]
    config, last = policies[-1][1], policies[-1][2]
    obs = jnp.asarray(pick_state(config, last, rollout_steps, state_seed))
    sets = {}
    for stage, _, sample in policies:
        label = (config.get("exp_name") or config["algo"]) if stage is None else f"stage {stage}"
        sets[label] = np.asarray(sample(obs, jax.random.PRNGKey(sample_seed), num_samples, from_prior))
    where = f"state after {rollout_steps} steps" if rollout_steps else "first state of a reset"
    title = f"{config['env_name']}, {config['algo']}\n{num_samples:,} actions at one state ({where})"
    return plot_density(sets, out, bw_factor, shared_axis, title)


def _save(fig, out: str) -> None:
    import matplotlib.pyplot as plt

    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="mean +- std learning curves over seeds, stage boundaries marked")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="curves.png")
    c.add_argument("--metric", default="eval/return", help="metrics.csv column (e.g. train/episode_return)")
    d = sub.add_parser("density", help="PC1 action density at one fixed state (paper Fig. 6/7)")
    d.add_argument("run_dir")
    d.add_argument("--stages", type=int, nargs="*", default=None,
                   help="stage checkpoints to draw (GoRL; default: every saved stage)")
    d.add_argument("--out", default="density.png")
    d.add_argument("--num-samples", type=int, default=10_000)
    d.add_argument("--rollout-steps", type=int, default=200,
                   help="steps of the last listed stage's policy before the state is taken (0: reset state)")
    d.add_argument("--state-seed", type=int, default=0)
    d.add_argument("--bw-factor", type=float, default=0.8)
    d.add_argument("--shared-axis", action="store_true",
                   help="project every stage on the PC1 of the pooled samples instead of its own")
    d.add_argument("--from-prior", action="store_true", help="latents from N(0, I) instead of the encoder")
    args = parser.parse_args(argv)
    if args.command == "curves":
        plot_curves(args.run_dirs, args.out, args.metric)
    else:
        density_from_run(args.run_dir, args.stages, args.out, args.num_samples, args.rollout_steps,
                         args.state_seed, args.bw_factor, args.shared_axis, args.from_prior)


if __name__ == "__main__":
    main()
