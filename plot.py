"""Figures from run folders: learning curves and the action-density figure (paper 002, Fig. 6/7).

    python plot.py curves runs/CartpoleBalance__ppo__1__* runs/CartpoleBalance__gorl_fm__* --out curves.png
    python plot.py density runs/HopperStand__gorl_fm__1__... --stages 0 1 2 3 --out density.png
    python plot.py video runs/HopperStand__gorl_fm__1__...            # RUN_DIR/video.mp4

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
video:   one evaluation episode of the deterministic policy (the mean action; GoRL: the encoder's
         mean latent through the decoder), rendered offscreen by the task's own `render` and
         written as an MP4 (a GIF without an MP4 encoder). A GoRL run shows one clip per saved
         stage, side by side, all from the same start state.

This is a tool, not an algorithm file: it imports the algorithm module named by a run's config
("algo") to run its policy. Only numpy and matplotlib draw figures (no seaborn / sklearn);
videos are rendered by MuJoCo, labelled with Pillow and encoded by imageio-ffmpeg's ffmpeg.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import warnings
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
    import running

    config = run_config(run_dir)
    algo = config.get("algo")
    if algo not in DENSITY_ALGOS or config.get("plain_sac"):
        name = config.get("exp_name") or algo
        raise SystemExit(f"error: {run_dir} is a run of {name}; density draws the policies of "
                         f"{', '.join(a + '.py' for a in DENSITY_ALGOS)} runs (a Gaussian policy or a "
                         "GoRL decoder whose sampler plot.py knows)")
    if algo == "ppo":
        import ppo

        state = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))

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
    state = running.load_checkpoint(path)
    params = list(inspect.signature(module.sample_actions).parameters)
    extra = {p: _config_value(config[p]) for p in params[4:] if p in config}

    def sample(obs, key, n, from_prior=False):
        return module.sample_actions(state, obs, key, n, from_prior=from_prior, **extra)

    return config, sample


def run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {run_dir} is not a run folder (no config.json)")
    with open(path) as f:
        return json.load(f)


def saved_stages(run_dir: str) -> list[int]:
    """K of every checkpoints/stageK.npz, in order: the completed stages of a GoRL run."""
    names = os.listdir(os.path.join(run_dir, "checkpoints")) if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
    return sorted(int(n[5:-4]) for n in names if n.startswith("stage") and n.endswith(".npz") and n[5:-4].isdigit())


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
        stages = saved_stages(run_dir) or [None]  # a GoRL run: every saved stage; otherwise the run's latest policy
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


# ---------------------------------------------------------------------------------------------
# Video: one evaluation episode of the deterministic policy, rendered offscreen
# ---------------------------------------------------------------------------------------------


VIDEO_ALGOS = ("ppo", "fpo", "dppo", "gorl_fm", "gorl_diffusion", "gorl_sac")
GL_HINT = ("install libegl1 for MUJOCO_GL=egl or libosmesa6 for MUJOCO_GL=osmesa (Debian/Ubuntu package names; "
           "an NVIDIA driver brings its own EGL)")
_GL_PROBE = "import mujoco; mujoco.Renderer(mujoco.MjModel.from_xml_string('<mujoco/>'), 16, 16).close()"


def gl_backend_error(backend: str) -> str | None:
    """Why MuJoCo cannot render offscreen with MUJOCO_GL=`backend` here (None: it can).

    Tried in a child process: MuJoCo fixes its OpenGL backend when it is first imported, and a
    backend that fails to start may take the process down with it.
    """
    result = subprocess.run([sys.executable, "-c", _GL_PROBE], env={**os.environ, "MUJOCO_GL": backend},
                            capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def select_gl_backend(candidates: tuple[str, ...] = ("egl", "osmesa")) -> str:
    """Set MUJOCO_GL, before mujoco is imported, to the first of `candidates` that renders here
    (the user's MUJOCO_GL, if set, is the only candidate); a clear error if none does."""
    if os.environ.get("MUJOCO_GL"):
        candidates = (os.environ["MUJOCO_GL"],)
    errors = {}
    for backend in candidates:
        errors[backend] = gl_backend_error(backend)
        if errors[backend] is None:
            os.environ["MUJOCO_GL"] = backend
            return backend
    tried = " nor ".join(f"MUJOCO_GL={b} ({e})" for b, e in errors.items())
    raise SystemExit(f"error: MuJoCo could not create an offscreen OpenGL context with {tried}: {GL_HINT}")


def check_renderer(model, height: int, width: int) -> None:
    """Fail before the episode runs: a size beyond the task's offscreen framebuffer, or no OpenGL
    context in this process (mujoco was imported before plot.py could choose MUJOCO_GL)."""
    import mujoco

    limit = model.vis.global_
    if width > limit.offwidth or height > limit.offheight:
        raise SystemExit(f"error: --width {width} --height {height}: the task's offscreen framebuffer is "
                         f"{limit.offwidth} x {limit.offheight}")
    try:
        mujoco.Renderer(model, height, width).close()
    except Exception as e:  # which error depends on the backend; the message names it
        raise SystemExit(f"error: MuJoCo cannot render offscreen in this process ({type(e).__name__}: {e}). It "
                         f"chooses its OpenGL backend (MUJOCO_GL, now {os.environ.get('MUJOCO_GL') or 'unset'}) when "
                         f"mujoco is first imported: run `python plot.py video ...`, or set MUJOCO_GL=egl or osmesa "
                         f"before importing mujoco; {GL_HINT}")


def camera_name(model, camera: str | None) -> str | None:
    """The camera to render from: `camera` by name or index, by default the task's first (in the
    DMC tasks one that follows the body); None, MuJoCo's free camera, for "free" or a model without
    cameras. A name, because Brax's render reads camera 0 as the free camera."""
    names = [model.camera(i).name for i in range(model.ncam)]
    if camera == "free" or (camera is None and not names):
        return None
    camera = "0" if camera is None else camera
    if camera.isdigit() and int(camera) < len(names):
        return names[int(camera)]
    if camera in names:
        return camera
    raise SystemExit(f"error: --camera {camera}: the task's cameras are {', '.join(names) or 'none'} "
                     "(by name or index), or 'free'")


def video_checkpoints(path: str, stages: list[int] | None) -> tuple[str, dict, list[tuple[str, str]]]:
    """(run folder, its config, [(label, checkpoint path)]) for `path`, a run folder or one
    checkpoint in it: every saved stage of a GoRL run (or `stages`), a baseline's latest.npz."""
    single = path.endswith(".npz")  # RUN_DIR/checkpoints/<name>.npz
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path))) if single else path
    config = run_config(run_dir)
    algo, name = config.get("algo"), config.get("exp_name") or config.get("algo")
    if algo not in VIDEO_ALGOS:
        raise SystemExit(f"error: {run_dir} is a run of {name}; video renders runs of "
                         f"{', '.join(a + '.py' for a in VIDEO_ALGOS)}")
    staged = algo.startswith("gorl") and not config.get("plain_sac")
    if single or not algo.startswith("gorl"):
        if stages:
            raise SystemExit("error: --stages selects the stages of a GoRL run folder"
                             + (", not of one checkpoint" if single else f"; a {name} run has one policy"))
        paths = [path if single else os.path.join(run_dir, "checkpoints", "latest.npz")]
    else:
        paths = [os.path.join(run_dir, "checkpoints", f"stage{k}.npz") for k in stages or saved_stages(run_dir)]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if missing or not paths:
        folder = os.path.join(run_dir, "checkpoints")
        held = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise SystemExit(f"error: no checkpoint {', '.join(missing) or 'of a completed stage'} in {folder}, which holds "
                         f"{', '.join(held) or 'nothing yet'} (GoRL writes stageK.npz when stage K ends, the "
                         "baselines latest.npz at every evaluation)")
    labels = [f"stage {os.path.basename(p)[5:-4]}" if staged else name for p in paths]
    return run_dir, config, list(zip(labels, paths))


def deterministic_act(algo: str, args, action_size: int):
    """`act(policy, obs) -> pre-squash action`: the policy each script evaluates with deterministic
    evaluation, the mean action (GoRL: the encoder's mean latent through the decoder). `policy`
    holds the checkpoint's parameters and normalizers."""
    import common

    module = importlib.import_module(algo)
    if algo == "ppo":
        return lambda p, obs: module.act(p["params"], p["norm"], obs, None, True)
    if algo in ("fpo", "dppo"):
        return lambda p, obs: module.act(p["params"], p["norm"], obs, action_size, args)
    if algo == "gorl_sac":  # the encoder's mean latent, then g(s, z) (z itself with --plain-sac)
        decoder_act = module.make_act(args)

        def act(p, obs):
            z, _ = module.encoder(p["params"]["encoder"], common.normalize(p["norm"], obs))
            return decoder_act(module.TrainState(**p), obs, z)

        return act

    def act(p, obs):  # gorl_fm, gorl_diffusion
        z = module.mean_latent(p["params"]["encoder"], common.normalize(p["norm"], obs), args.bounded_latent)
        return common.env_action(module.act(module.TrainState(**p), obs, z, args), args.action_semantics)

    return act


def make_episode(env, act):
    """`episode(policy, key, num_steps)`: the reset state and the state after each of `num_steps`
    steps of `act` (the task receives tanh of its action), stacked. `env` is the bare task, with
    no auto-reset to overwrite the state an episode ends in."""
    import jax
    import jax.numpy as jnp

    def episode(policy, key, num_steps):
        def step(state, _):
            state = env.step(state, jnp.tanh(act(policy, state.obs[None])[0]))
            return state, state

        first = env.reset(key)
        _, states = jax.lax.scan(step, first, None, length=num_steps)
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, states)

    return jax.jit(episode, static_argnums=2)


def render_clip(env, states, height: int, width: int, camera: str | None) -> tuple[np.ndarray, float]:
    """Frames [T, height, width, 3] of stacked host `states` up to the first `done` (a task's early
    termination), through the task's own `render`; and the return of those steps."""
    import jax

    done = np.flatnonzero(np.asarray(states.done)[1:])
    steps = int(done[0]) + 1 if len(done) else len(states.done) - 1
    trajectory = [jax.tree.map(lambda x: x[t], states) for t in range(steps + 1)]
    if hasattr(trajectory[0], "pipeline_state"):  # a Brax task (gorl_sac's Gym tasks) renders those
        trajectory = [s.pipeline_state for s in trajectory]
    frames = np.stack(env.render(trajectory, height=height, width=width, camera=camera))
    return frames, float(np.sum(states.reward[1 : steps + 1]))


def side_by_side(clips: list[np.ndarray], labels: list[str]):
    """Frame t of every clip in one row, each labelled at its top left (Pillow); a clip whose
    episode ended earlier holds its last frame."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = clips[0].shape[1:3]
    font = ImageFont.load_default(size=max(10, height // 16))
    for t in range(max(len(c) for c in clips)):
        image = Image.fromarray(np.concatenate([c[min(t, len(c) - 1)] for c in clips], axis=1))
        draw = ImageDraw.Draw(image)
        for i, label in enumerate(labels):
            draw.text((i * width + 6, 4), label, font=font, fill="white", stroke_width=2, stroke_fill="black")
        yield np.asarray(image)


def write_video(frames, size: tuple[int, int], out: str, fps: float) -> str:
    """RGB frames of `size` (width, height) as an MP4 (H.264) through imageio-ffmpeg's ffmpeg, or as
    a GIF (Pillow) when `out` ends in .gif or no ffmpeg is found. Returns the path written."""
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if not out.lower().endswith(".gif"):
        try:
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError) as e:
            out = os.path.splitext(out)[0] + ".gif"
            print(f"no MP4 encoder ({type(e).__name__}: {e}; pip install imageio-ffmpeg): writing {out} instead")
        else:
            writer = imageio_ffmpeg.write_frames(out, size, fps=fps, macro_block_size=2)  # H.264 needs even sizes
            with warnings.catch_warnings():  # JAX warns of any fork; subprocess execs ffmpeg in the child at once
                warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
                writer.send(None)  # starts ffmpeg
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
            return out
    from PIL import Image

    # Viewers show a GIF frame shorter than 20 ms for 100 ms: a faster clip keeps every k-th frame.
    k = math.ceil(fps / 50)
    images = [Image.fromarray(f) for i, f in enumerate(frames) if i % k == 0]
    images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 * k / fps), loop=0)
    return out


def video_from_run(path: str, out: str | None = None, stages: list[int] | None = None, episode_length: int = 1000,
                   height: int = 240, width: int = 320, camera: str | None = None, fps: float | None = None,
                   seed: int = 0) -> str:
    """One episode of the deterministic policy of every requested checkpoint of a run, from the
    same start state (reset key `seed`), side by side in one video (default RUN_DIR/video.mp4)."""
    if min(episode_length, height, width) < 1 or (fps is not None and fps <= 0):
        raise SystemExit("error: --episode-length, --height, --width and --fps must be positive")
    run_dir, config, checkpoints = video_checkpoints(path, stages)
    if "mujoco" not in sys.modules:  # else its backend is chosen already; check_renderer tries it
        select_gl_backend()
    import jax

    import running

    module = importlib.import_module(config["algo"])
    args = running.args_from_run(module.Args, run_dir)
    # The script's own make_env (gorl_sac's adds Brax's Gym tasks): the bare task, which renders.
    env = module.make_env(args)
    model = getattr(env, "sys", env).mj_model  # a Brax task keeps its MuJoCo model in env.sys
    camera = camera_name(model, camera)
    check_renderer(model, height, width)
    episode = make_episode(env, deterministic_act(config["algo"], args, env.action_size))
    keys = getattr(module, "STAGE_KEYS", ("params", "norm"))  # what the policy reads of a checkpoint
    clips, labels = [], []
    for label, checkpoint_path in checkpoints:
        checkpoint = running.load_checkpoint(checkpoint_path)
        states = jax.device_get(episode({k: checkpoint[k] for k in keys}, jax.random.PRNGKey(seed), episode_length))
        frames, episode_return = render_clip(env, states, height, width, camera)
        print(f"{label}: {len(frames) - 1} steps, return {episode_return:.1f}")
        clips.append(frames)
        labels.append(f"{label}, return {episode_return:.1f}")
    fps = fps or 1.0 / float(env.dt)  # real time
    out = write_video(side_by_side(clips, labels), (width * len(clips), height),
                      out or os.path.join(run_dir, "video.mp4"), fps)
    print(f"wrote {out}: {len(clips)} clip(s) of {width}x{height}, {max(len(c) for c in clips)} frames at {fps:g} fps")
    return out


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
    v = sub.add_parser("video", help="one evaluation episode of the deterministic policy as an MP4; "
                                     "a GoRL run's stages side by side")
    v.add_argument("run_dir", help="a run folder, or one checkpoint in it (RUN_DIR/checkpoints/stageK.npz)")
    v.add_argument("--out", default=None, help="default: RUN_DIR/video.mp4; a .gif name writes a GIF")
    v.add_argument("--stages", type=int, nargs="*", default=None,
                   help="stage checkpoints to show side by side (GoRL; default: every saved stage)")
    v.add_argument("--episode-length", type=int, default=1000,
                   help="environment steps to show (an evaluation episode: 1000); frames: one more, the reset state")
    v.add_argument("--height", type=int, default=240, help="of one clip, in pixels")
    v.add_argument("--width", type=int, default=320, help="of one clip, in pixels")
    v.add_argument("--camera", default=None,
                   help="a camera of the task's model, by name or index (default: its first); 'free': MuJoCo's free camera")
    v.add_argument("--fps", type=float, default=None, help="default: real time, 1 / the task's control step")
    v.add_argument("--seed", type=int, default=0, help="key of the episode's reset: the same start state for every stage")
    args = parser.parse_args(argv)
    if args.command == "curves":
        plot_curves(args.run_dirs, args.out, args.metric)
    elif args.command == "video":
        video_from_run(args.run_dir, args.out, args.stages, args.episode_length, args.height, args.width,
                       args.camera, args.fps, args.seed)
    else:
        density_from_run(args.run_dir, args.stages, args.out, args.num_samples, args.rollout_steps,
                         args.state_seed, args.bw_factor, args.shared_axis, args.from_prior)


if __name__ == "__main__":
    main()
