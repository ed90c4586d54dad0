"""How a run is run: everything around the algorithm that the algorithm files share.

Flag checks, the task-dependent settings, run folders (config.json, metrics.csv, TensorBoard,
Weights & Biases, checkpoints), seeds trained side by side and their placement on the devices,
the process's runtime settings (matmul precision, compilation cache, multi-host), the progress
line and compile notices, and `--resume`. None of it is the method: the mathematics is in
`common.py`, the algorithm in its own file. This module names no algorithm file; each script
passes its own name and its own per-task values.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from typing import Any, Callable, Literal

def _gpu_settings() -> None:
    """What a GPU run needs, set before JAX starts its backend (a value the user set wins).

    XLA_PYTHON_CLIENT_PREALLOCATE=false: JAX would take 75% of the GPU's memory per process, so a
    second process (plot.py video beside a run, seeds as separate processes) could not start;
    MuJoCo Playground's training scripts set the same. --xla_gpu_triton_gemm_any=True: up to 30%
    faster MJX on a GPU (MJX documentation), added to the user's XLA_FLAGS only where a CUDA
    plugin is installed, so a CPU-only jaxlib never sees a GPU flag.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import importlib.util

    has_cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    flags = os.environ.get("XLA_FLAGS", "")
    if has_cuda and "xla_gpu_triton_gemm_any" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_triton_gemm_any=True".strip()


_gpu_settings()  # JAX reads these when its backend starts, at the first computation, not at import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from mujoco_playground import registry  # noqa: E402
from mujoco_playground._src import mjx_env  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402



@dataclasses.dataclass
class RunFlags:
    """The flags of how a run is run, shared by every script; its Args adds the algorithm's."""

    env_name: str = "HopperStand"
    """DMC task from MuJoCo Playground (e.g. CheetahRun, FingerSpin, HopperStand, WalkerWalk)"""
    seed: int = 1
    """random seed"""
    num_seeds: int = 1
    """seeds trained side by side in this process: seed, seed+1, ..., each with its own run folder"""
    distributed: bool = False
    """join JAX's multi-host runtime (jax.distributed.initialize); each process trains its own seeds"""
    impl: Literal["jax", "warp"] = "jax"
    """physics backend of Playground's tasks: jax (MJX) or warp (MuJoCo Warp)"""
    episode_length: int | None = None
    """steps per episode, ended as a truncation (None: the environment's own, 1000 on DMC tasks)"""
    matmul_precision: Literal["default", "high", "highest"] | None = None
    """float32 matmuls on a GPU: default (TF32 on recent NVIDIA GPUs), high or highest; None: the task's (humanoids: highest)"""
    runs_dir: str = "runs"
    """where run folders are created"""
    exp_name: str | None = None
    """name of the experiment, in the run folder <env>__<exp_name>__<seed>__<time> (None: the script's name, with the ablation flags that are on appended)"""
    track: bool = False
    """mirror config.json and metrics.csv to Weights & Biases (pip install wandb; WANDB_MODE=offline needs no account)"""
    wandb_project: str = "gorl"
    """Weights & Biases project, with --track"""
    wandb_entity: str | None = None
    """Weights & Biases entity (user or team), with --track; None: your default entity"""
    resume: str | None = None
    """run folder to resume where it stopped: inside a stage or after its last completed one, from its last checkpoint (its config.json replaces the other flags)"""


def start(args, args_cls, resolve: Callable, validate: Callable):
    """A script's flags as its run uses them, before anything compiles: a resumed run's own
    (config.json), the task's values filled in (`resolve`), checked (`validate`: an error names
    every bad flag), and the process's runtime set up (`start_runtime`)."""
    if args.resume:
        args = args_from_run(args_cls, args.resume, resume=args.resume)
    args = resolve(args)  # config.json records the resolved values
    validate(args)
    start_runtime(args)
    return args


def check_args(checks: list[tuple[bool, str]]) -> None:
    """Exit with every violated condition's message (scripts call this before compiling)."""
    errors = [message for ok, message in checks if not ok]
    if errors:
        sys.exit("error: " + "\n       ".join(errors))


def per_stage(values: tuple, stage: int):
    """A per-stage flag's value in `stage`: the last value holds for every later stage."""
    return values[min(stage, len(values) - 1)]


def choice_checks(args) -> list[tuple[bool, str]]:
    """Every `Literal` flag of `args` holds one of its choices. tyro already refuses other
    values on the command line; this catches them in an `Args(...)` built in Python."""
    checks = []
    for name, hint in typing.get_type_hints(type(args)).items():
        options = (hint,) if typing.get_origin(hint) is Literal else typing.get_args(hint)  # X, or X | None
        per_stage = [arg for arg in options if typing.get_origin(arg) is tuple]  # tuple[Literal[...], ...]
        options = typing.get_args(per_stage[0]) if per_stage else options
        choices = [c for arg in options if typing.get_origin(arg) is Literal for c in typing.get_args(arg)]
        value = getattr(args, name)
        if choices and not (value is None and type(None) in typing.get_args(hint)):  # None: the task's value
            values = value if per_stage and isinstance(value, tuple) and value else (value,)
            bad = [v for v in values if v not in choices]
            checks.append((not bad, f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                                    f"got {bad[0] if bad else value!r}"))
    return checks


def positive_checks(args, *names: str) -> list[tuple[bool, str]]:
    """One check: the flags `names` are positive (a None, "all" or "the task's", passes)."""
    bad = [n for n in names if getattr(args, n) is not None and not getattr(args, n) > 0]
    return [(not bad, f"{', '.join('--' + n.replace('_', '-') for n in bad)} must be positive")]


def staged_checks(args, steps_per_iteration: int) -> list[tuple[bool, str]]:
    """The checks the staged PPO scripts (GoRL-FM, GoRL-Diffusion) share: the stages' budgets,
    the per-stage values, the refinement's data and selection flags, a frozen decoder's file."""
    episodes = args.refine_episodes
    held_out = max(1, int(episodes * args.refine_val_fraction))
    return [
        (len(args.stage_steps) >= 1, "--stage-steps needs at least one stage"),
        (all(n >= steps_per_iteration for n in args.stage_steps),
         f"every stage in --stage-steps {list(args.stage_steps)} must hold at least one iteration "
         f"({steps_per_iteration:,} steps = batch_size * num_minibatches * unroll_length)"),
        *[(len(values) >= 1 and min(values) >= 0, f"--{name.replace('_', '-')} needs one or more values >= 0, got {values}")
          for name in ("learning_rate", "clip_eps", "max_grad_norm", "kl_beta", "ent_coef")
          for values in [getattr(args, name)]],
        *positive_checks(args, "refine_envs", "refine_episodes", "refine_batch_size", "refine_draws", "refine_eval_every",
                         "refine_val_size"),
        (episodes % max(args.refine_envs or episodes, 1) == 0,
         f"--refine-episodes {episodes} must be a multiple of --refine-envs {args.refine_envs}"),
        (0 < args.refine_val_fraction < 1 and held_out < episodes,
         f"--refine-val-fraction {args.refine_val_fraction} must hold out at least one of the "
         f"{episodes} refinement episodes and leave at least one for training"),
        (args.decoder_target_clip >= 0, "--decoder-target-clip must be >= 0 (0: no clip)"),
        (args.frozen_decoder is None or os.path.isfile(args.frozen_decoder),
         f"--frozen-decoder {args.frozen_decoder!r} is not a file (expected runs/.../checkpoints/stageK.npz)"),
    ]


def ppo_layout_checks(args) -> list[tuple[bool, str]]:
    """The flag checks every PPO-family script shares (the choice flags, episode length, batch
    layout, update form, evaluation), for `check_args`: one iteration is batch_size *
    num_minibatches sequences of unroll_length steps, spread evenly over num_envs environments.
    (The task name is checked where it is loaded, `load_playground_env`: a script given its own
    environment never uses it.)"""
    sequences = args.batch_size * args.num_minibatches
    return [
        *choice_checks(args),
        *positive_checks(args, "episode_length", "num_envs", "unroll_length", "batch_size", "num_minibatches",
                         "num_epochs", "eval_every", "num_eval_envs"),
        (sequences % max(args.num_envs, 1) == 0,
         f"--batch-size * --num-minibatches = {sequences} sequences per iteration must be a multiple of "
         f"--num-envs = {args.num_envs}, so that every environment runs whole sequences"),
        (args.advantages != "minibatch" or args.minibatch_unit == "sequence",
         "--advantages minibatch runs GAE along each minibatch's sequences: it needs --minibatch-unit sequence"),
    ]


# ---------------------------------------------------------------------------------------------
# Environments by name, and clear errors for a user's environment
# ---------------------------------------------------------------------------------------------


def dmc_env_names() -> tuple[str, ...]:
    """Names of the DeepMind Control Suite tasks that MuJoCo Playground provides."""
    return tuple(registry.dm_control_suite.ALL_ENVS)


def playground_env_names() -> tuple[str, ...]:
    """Every task in MuJoCo Playground's registry: DMC, locomotion and manipulation."""
    return tuple(registry.ALL_ENVS)


def env_name_check(name: str) -> tuple[bool, str]:
    """(is valid, error message listing the valid names), for `check_args`."""
    return name in playground_env_names(), (
        f"unknown task {name!r}; valid MuJoCo Playground tasks are the DMC tasks {', '.join(dmc_env_names())}; "
        f"the locomotion tasks {', '.join(registry.locomotion.ALL_ENVS)}; and the manipulation tasks "
        f"{', '.join(registry.manipulation.ALL_ENVS)}. To train on your own environment, pass it to main() "
        "(README, \"Your own environment\")")


MENAGERIE_MESSAGE = """MuJoCo Playground could not load {name!r}: its robot model comes from mujoco_menagerie,
which Playground clones with git into {path} on first use (this failed: {error}).
With no network here, clone it where there is one and copy it over:
    git clone https://github.com/deepmind/mujoco_menagerie.git
    git -C mujoco_menagerie checkout {commit}
    cp -r mujoco_menagerie {path}
(remove a partial {path} first). The DMC tasks need no download."""


def load_playground_env(name: str, impl: str = "jax"):
    """`registry.load(name)` on the given physics backend. An unknown name stops with the list of
    valid ones; a task whose assets are missing (the menagerie clone failed: no network, no git)
    stops with what to provide, not a git error."""
    ok, message = env_name_check(name)
    if not ok:
        sys.exit(f"error: {message}")
    if impl not in ("jax", "warp"):
        sys.exit(f"error: unknown impl {impl!r}; choose jax or warp")
    if name in dmc_env_names():
        return registry.load(name, config_overrides={"impl": impl})
    try:
        return registry.load(name, config_overrides={"impl": impl})
    except Exception as error:  # a failed clone, or the missing files of a partial one
        raise SystemExit("error: " + MENAGERIE_MESSAGE.format(
            name=name, path=mjx_env.MENAGERIE_PATH, commit=mjx_env.MENAGERIE_COMMIT_SHA,
            error=f"{type(error).__name__}: {error}")) from error


def check_observation(observation_size) -> None:
    """Observations are an array or a dict with a "state" entry (the actor's, the encoder's and
    the decoder's input); a "privileged_state" entry, when there is one, is the critic's."""
    if isinstance(observation_size, dict) and "state" not in observation_size:
        raise ValueError(f"the environment's observation is a dict with the keys {', '.join(observation_size)}; "
                         "it needs a \"state\" entry (the policy's input) and may have a \"privileged_state\" "
                         "entry (the critic's)")


def action_range_notice(env) -> str | None:
    """A line for a user's MJX environment whose actuators' ctrlrange is not [-1, 1]: the
    algorithms act in [-1, 1] (tanh), and scaling to the actuators is the environment's job."""
    model = getattr(env, "mj_model", None)
    if model is None or not model.nu:
        return None
    ranges = np.asarray(model.actuator_ctrlrange)
    limited = np.asarray(model.actuator_ctrllimited, bool) if hasattr(model, "actuator_ctrllimited") else True
    if np.all(~limited | ((ranges[:, 0] == -1) & (ranges[:, 1] == 1))):
        return None
    return (f"note: the environment receives actions in [-1, 1] (tanh of the policy's output); its actuators' ctrlrange "
            f"is {ranges.tolist()}. If its step() writes the action to data.ctrl unscaled, scale it there "
            "(MuJoCo Playground's convention: low + (a + 1) / 2 * (high - low)).")


def check_environment(env) -> None:
    """What `common.make_env` checks of a bare environment before wrapping it: the observation's
    layout (an error), and for a user's MJX environment the actuators' range (a note)."""
    check_observation(env.observation_size)
    notice = action_range_notice(env)
    if notice:
        print(notice, flush=True)


# ---------------------------------------------------------------------------------------------
# Per-task settings: the values the released code sets per task, resolved in one place
# ---------------------------------------------------------------------------------------------

# What every method takes on a task, from the newest release of the original code
# (bennidict23/GoRL, configs/tasks/*.toml) or MuJoCo Playground's tuned Brax PPO configs (which
# older releases read). Keys are Args field names; a script uses those its Args has. What one
# method sets per task (the release's configs/methods/*.toml profiles) is in that method's file,
# its own TASK_SETTINGS beside its TASK_DEFAULTS. A flag whose value depends on the task defaults
# to None, "the task's value", and `resolve_task_settings` fills it in; config.json records the
# resolved values.
TASK_SETTINGS: dict[str, dict] = {
    "BallInCup": {"discount": 0.95},  # Playground's brax_ppo_config
    "FingerSpin": {"discount": 0.95},
    # The humanoids' float32 matmuls at full precision ([runtime]); elsewhere a GPU's default
    # (TF32 on recent NVIDIA GPUs).
    "HumanoidStand": {"matmul_precision": "highest"},
    "HumanoidRun": {"matmul_precision": "highest", "stage_steps": (60_000_000, 60_000_000)},
}


def resolve_task_settings(args, own: dict[str, dict], defaults: dict):
    """`args` with every task-dependent flag left at None replaced by the task's value.

    `own` is the script's table of its per-task values, `defaults` maps each task-dependent
    field of its Args to the value on a task that sets nothing. Precedence: the script's entry
    for the task, the task's entry in TASK_SETTINGS, then `defaults`. A flag given on the
    command line (not None) always wins.
    """
    layers = (own.get(args.env_name, {}), TASK_SETTINGS.get(args.env_name, {}), defaults)
    resolved = {}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            resolved[name] = next(layer[name] for layer in layers if name in layer)
    return dataclasses.replace(args, **resolved)


# ---------------------------------------------------------------------------------------------
# Run folder: config, CSV, TensorBoard, checkpoints, progress
# ---------------------------------------------------------------------------------------------


# Checkpoints are .npz files read with allow_pickle=False: the arrays, plus the tree's structure
# as JSON. Unlike a pickle, loading one cannot run code, so a checkpoint from anyone is safe to
# open. The structure knows dicts (string keys), lists, tuples, NamedTuples (the normalizer's and
# optax's states, rebuilt only from those modules: a checkpoint holds a training state's fields,
# never the state itself), None, bools, ints, floats and strings.
CHECKPOINT_FORMAT = "gorl-checkpoint/1"
_TREE_ENTRY = "__tree__"
_NAMEDTUPLE_MODULES = ("common", "optax")


def _encode(node, arrays: dict):
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(node)
        return {"array": name}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        return {"namedtuple": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f: _encode(getattr(node, f), arrays) for f in node._fields}}
    if isinstance(node, (list, tuple)):
        return {type(node).__name__: [_encode(x, arrays) for x in node]}
    if isinstance(node, dict) and all(isinstance(k, str) for k in node):
        return {"dict": {k: _encode(v, arrays) for k, v in node.items()}}
    raise TypeError(f"cannot checkpoint a {type(node).__name__}")


def _namedtuple_class(name: str):
    module, _, qualname = name.partition(":")
    if module.split(".")[0] not in _NAMEDTUPLE_MODULES:
        raise ValueError(f"a NamedTuple from module {module!r}, which checkpoints may not name")
    cls = sys.modules.get(module) or __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise ValueError(f"{name} is not a NamedTuple")
    return cls


def _decode(node: dict, arrays):
    kind, value = next(iter(node.items()))  # the first key says what the node is
    if kind == "array":
        return jnp.asarray(arrays[value])
    if kind == "value":
        return value
    if kind in ("list", "tuple"):
        items = [_decode(x, arrays) for x in value]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(v, arrays) for k, v in value.items()}
    if kind == "namedtuple":
        fields = {k: _decode(v, arrays) for k, v in node["fields"].items()}
        return _namedtuple_class(value)(**fields)
    raise ValueError(f"unknown node {kind!r}")


def save_checkpoint(path: str, tree: Any) -> None:
    """Write a pytree (moved to host numpy) atomically, so an interrupt never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays: dict = {}
    structure = {"format": CHECKPOINT_FORMAT, "tree": _encode(jax.device_get(tree), arrays)}
    arrays[_TREE_ENTRY] = np.frombuffer(json.dumps(structure).encode(), dtype=np.uint8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Any:
    """The pytree `save_checkpoint` wrote, arrays on the device. A file that is missing,
    truncated, altered or not a checkpoint of this format stops with a message saying so."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        structure = json.loads(arrays.pop(_TREE_ENTRY).tobytes().decode())
        if structure.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {structure.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        return _decode(structure["tree"], arrays)
    except FileNotFoundError:
        sys.exit(f"error: checkpoint {path} does not exist")
    except Exception as e:  # zip, JSON, missing array, unknown class: one clear message
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e}); checkpoints are "
                 f"written by save_checkpoint as .npz, and pickles are not loaded (loading one can run code)")


def args_from_run(args_cls, run_dir: str, **overrides):
    """The Args a run was started with (its config.json), for `--resume`."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        sys.exit(f"error: {run_dir!r} is not a run folder (no config.json)")
    with open(path) as f:
        config = json.load(f)
    fields = {f.name for f in dataclasses.fields(args_cls)}
    hints = typing.get_type_hints(args_cls)
    # A flag that became per-stage since the run started (one value then, a tuple now) holds for every stage.
    per_stage_now = {k for k, h in hints.items() if tuple in (typing.get_origin(h), *map(typing.get_origin, typing.get_args(h)))}
    config = {k: tuple(v) if isinstance(v, list) else (v,) if k in per_stage_now and isinstance(v, (int, float, str)) else v
              for k, v in config.items() if k in fields}
    return dataclasses.replace(args_cls(**config), **overrides)


def run_folder_name(args, exp_name: str, stamp: str | None = None) -> str:
    """<env>__<exp_name>__<seed>__<time>, CleanRL's run name."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", exp_name):
        sys.exit(f"error: --exp-name {exp_name!r}: use letters, digits, '.', '_' and '-' only")
    return f"{args.env_name}__{exp_name}__{args.seed}__{stamp or time.strftime('%Y%m%d-%H%M%S')}"


class Run:
    """The run folder `runs/<env>__<exp_name>__<seed>__<time>/` and the console progress line.

    `algo` is the script (plot.py imports it to load a policy); the experiment name is
    `args.exp_name`, else `default_exp_name` (an ablation's name), else `algo` (CleanRL's
    convention). config.json records both; `plot.py curves` groups runs by the name.
    """

    def __init__(self, args, algo: str, run_dir: str | None = None, default_exp_name: str | None = None,
                 seed_group: list[str] | None = None):
        exp_name = getattr(args, "exp_name", None) or default_exp_name or algo
        if run_dir is None:
            run_dir = os.path.join(args.runs_dir, run_folder_name(args, exp_name))
        self.dir = run_dir
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        config_path = os.path.join(run_dir, "config.json")
        self.new = not os.path.exists(config_path)  # (not a resumed run)
        if self.new:
            # seed_group: the folders of the seeds trained in the same process (--num-seeds).
            group = {"seed_group": seed_group} if seed_group else {}
            with open(config_path, "w") as f:
                json.dump({"algo": algo, **dataclasses.asdict(args), "exp_name": exp_name, **group}, f, indent=2)
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.rows: list[dict] = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path) as f:
                self.rows = list(csv.DictReader(f))
        self.columns = list(self.rows[0].keys()) if self.rows else ["step", "wall_time"]
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        self.wandb = None
        if getattr(args, "track", False):
            self.wandb = _wandb_run(args, run_dir, config_path)
        # A resumed run continues the wall-clock column where it stopped.
        self.start = time.time() - (float(self.rows[-1]["wall_time"]) if self.rows else 0.0)
        self.last_print = 0.0
        print(f"run folder: {run_dir}", flush=True)

    def forget_after(self, step: int, refinement_at_step: bool = False) -> None:
        """Drop logged rows past `step` (a resumed run repeats them from its checkpoint).

        A GoRL stage checkpoint is written before the refinement that follows it, which logs at
        the same step; `refinement_at_step` drops that row too, since resuming redoes it.
        """

        def repeated(r):
            at = int(float(r["step"]))
            return at > step or (refinement_at_step and at == step and any(
                k.startswith("refine/") and v not in (None, "") for k, v in r.items()))

        self.rows = [r for r in self.rows if not repeated(r)]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.dir, "checkpoints", name)

    def log(self, step: int, metrics: dict) -> None:
        """Append one row to metrics.csv (new columns rewrite the header) and to TensorBoard."""
        metrics = {k: float(v) for k, v in metrics.items()}
        row = {"step": int(step), "wall_time": round(time.time() - self.start, 2), **metrics}
        for k, v in metrics.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, int(step))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=int(step))
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        self.columns += new
        if new or len(self.rows) == 1:
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        self.tb.flush()

    def progress(self, step: int, total: int, sps: float, force: bool = False, **fields) -> None:
        """One status line at most every 2 seconds (always when forced)."""
        now = time.time()
        if not force and now - self.last_print < 2.0:
            return
        self.last_print = now
        elapsed = now - self.start
        parts = [f"step {step:,}/{total:,} ({100 * step / max(total, 1):.1f}%)", f"{sps:,.0f} steps/s"]
        for k, v in fields.items():
            parts.append(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"elapsed {_hms(elapsed)}")
        print(" | ".join(parts), flush=True)

    def completed_stages(self) -> list[int]:
        """Stages K with a saved checkpoints/stageK.npz (GoRL's unit of resumption)."""
        names = glob.glob(os.path.join(self.dir, "checkpoints", "stage*.npz"))
        return sorted(int(re.search(r"stage(\d+)\.npz$", n).group(1)) for n in names)

    def write_stage_table(self, rows: list[dict]) -> None:
        """Print and save (stages.md) the evaluation return at each stage boundary: the S0..S3
        table of paper 002, with the return of the refined decoder under prior latents."""
        lines = ["| stage | steps at end | eval return at end | eval return, prior latents + refined decoder |",
                 "|---|---|---|---|"]
        for r in rows:
            refined = f"{r['refined_prior_return']:.1f}" if r.get("refined_prior_return") is not None else "-"
            lines.append(f"| S{r['stage']} | {r['step']:,} | {r['return']:.1f} | {refined} |")
        table = "\n".join(lines)
        print(table)
        with open(os.path.join(self.dir, "stages.md"), "w") as f:
            f.write(table + "\n")

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(args, run_dir: str, config_path: str):
    """A Weights & Biases run mirroring this run folder (CleanRL's --track): named and keyed by
    the folder, so --resume continues the same W&B run. wandb is imported only here."""
    try:
        import wandb
    except ImportError:
        sys.exit("error: --track needs Weights & Biases, which requirements.txt does not install: pip install wandb")
    with open(config_path) as f:
        config = json.load(f)
    name = os.path.basename(os.path.normpath(run_dir))
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=name, config=config, dir=run_dir,
                      id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:], resume="allow")


# ---------------------------------------------------------------------------------------------
# Seeds in parallel: one process trains --num-seeds seeds, sharded over the local devices
# ---------------------------------------------------------------------------------------------


def seed_checks(args) -> list[tuple[bool, str]]:
    """The --num-seeds check every script shares, for `check_args`."""
    return [(args.num_seeds >= 1, f"--num-seeds must be at least 1, got {args.num_seeds}")]


def compilation_cache_dir(backend: str) -> str | None:
    """Where compiled programs are kept between runs: $JAX_COMPILATION_CACHE_DIR if set, else
    on a GPU or TPU $XDG_CACHE_HOME/gorl/jax (~/.cache/gorl/jax); None (off) on a CPU, where
    XLA warns at length about every cached program it loads, and with GORL_COMPILATION_CACHE=0."""
    if os.environ.get("GORL_COMPILATION_CACHE", "1") == "0":
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if backend == "cpu":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gorl", "jax")


def start_runtime(args) -> None:
    """Process-wide settings of a run, before anything is compiled: `--distributed`
    (`start_distributed`, which must come before JAX starts its backend), the float32 matmul
    precision (`args.matmul_precision`: on recent NVIDIA GPUs "default" is TF32, MJX physics
    included; the release runs the humanoids at "highest"), and a persistent compilation cache
    (a second run or seed skips the minutes of compiling; a cache already set wins)."""
    start_distributed(args.distributed)
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    cache = compilation_cache_dir(jax.default_backend())
    if cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        print(f"compiled programs are cached in {cache} (GORL_COMPILATION_CACHE=0 turns this off)", flush=True)


def start_distributed(enabled: bool) -> None:
    """--distributed: join JAX's multi-host runtime (`jax.distributed.initialize`), which finds
    the coordinator, the process count and this process's id in the cluster's environment
    (SLURM, Open MPI, Kubernetes, Cloud TPU), else in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID. Seeds need no communication: process p trains its own --num-seeds seeds,
    seed + p * num_seeds onwards, on its own devices, into its own run folders."""
    if enabled:
        counts = {name: int(os.environ[var]) for name, var in
                  (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
        jax.distributed.initialize(**counts)
        print(f"process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local device(s)", flush=True)


def device_layout(num_seeds: int, num_envs: int, num_devices: int) -> str | None:
    """Which axis is split over the devices: "seeds" when there are at least as many seeds as
    devices, else "envs" (each seed's environments); None on one device. A layout that does not
    split evenly stops here, before anything is compiled, with the numbers."""
    if num_devices == 1:
        return None
    if num_seeds >= num_devices:
        if num_seeds % num_devices:
            sys.exit(f"error: --num-seeds {num_seeds} cannot be split evenly over {num_devices} devices: use a "
                     f"multiple of {num_devices}, or fewer seeds than devices (then the environments are split)")
        return "seeds"
    if num_envs % num_devices:
        sys.exit(f"error: {num_seeds} seed(s) on {num_devices} devices split each seed's environments, and "
                 f"--num-envs {num_envs} is not a multiple of {num_devices}")
    return "envs"


def over_seeds(x, fmt: str = ".1f") -> str:
    """A per-seed value for the console: the value for one seed, else the mean [min, max] of
    the seeds that have one; "-" while none has (no training episode has finished yet)."""
    x = np.asarray(x, dtype=float).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return "-"
    if x.size == 1:
        return format(x[0], fmt)
    return f"{format(x.mean(), fmt)} [{format(x.min(), fmt)}, {format(x.max(), fmt)}]"


def seed_slice(tree, i: int):
    """Seed i's part of a tree whose arrays all carry a leading seed axis (other leaves as they are)."""
    return jax.tree.map(lambda x: x[i] if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def stack_seeds(trees: list, what: str):
    """The seeds' trees in one, arrays stacked on a new leading axis; the other leaves (steps,
    stage numbers) must agree, since the seeds train in lockstep."""

    def stack(*xs):
        if isinstance(xs[0], (jax.Array, np.ndarray, np.generic)):
            return jnp.stack([jnp.asarray(x) for x in xs])
        if any(x != xs[0] for x in xs):
            sys.exit(f"error: the seeds' {what} disagree ({', '.join(map(str, xs))}); resume them one by one")
        return xs[0]

    return jax.tree.map(stack, *trees)


class Runs:
    """The seeds one process trains side by side (--num-seeds N: seed, seed+1, ..., seed+N-1),
    each with an ordinary run folder, so `plot.py curves` and `--resume` see separate runs.

    The whole training state carries a leading seed axis. `parallel(f)` turns a function of one
    seed's state into one over all seeds (`jax.vmap`, then `jax.jit`; with one seed, `f` itself
    on the squeezed axis): each seed computes what a run with that seed alone computes. With more
    than one local device the seed axis is sharded over them, or, with fewer seeds than devices,
    each seed's environments (a `Mesh` and `NamedSharding`s; parameters are then replicated). `log`, `progress`, `save` and the resume
    methods take per-seed arrays and write each seed's slice to its own folder.
    """

    def __init__(self, args, algo: str, total_steps: int = 0, default_exp_name: str | None = None):
        self.algo, self.total_steps = algo, total_steps  # the script, and the steps for the progress line
        self.started = time.time()
        if args.resume:
            per_seed = [args_from_run(type(args), d, resume=d) for d in self._group(args.resume)]
        else:
            first = args.seed + jax.process_index() * args.num_seeds
            per_seed = [dataclasses.replace(args, seed=first + i) for i in range(args.num_seeds)]
        self.seeds = [a.seed for a in per_seed]
        # What `timed` measured and `log_iteration` last saw, for the progress line.
        self._iteration_seconds: list[float] = []
        self._steps_per_second = math.nan
        self._last_train_return = self._last_eval_return = np.full(len(self.seeds), np.nan)
        self.devices = jax.local_devices()
        self.layout = device_layout(len(self.seeds), args.num_envs, len(self.devices))
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("devices",)) if self.layout else None
        self.num_envs = args.num_envs
        if args.resume:
            if len(per_seed) > 1:
                print(f"resuming the {len(per_seed)} seeds trained together: {', '.join(map(str, self.seeds))}")
            self.runs = [Run(a, algo, run_dir=a.resume) for a in per_seed]
        else:
            exp_name = getattr(args, "exp_name", None) or default_exp_name or algo
            stamp = time.strftime("%Y%m%d-%H%M%S")
            names = [run_folder_name(a, exp_name, stamp) for a in per_seed]
            group = names if len(names) > 1 else None
            self.runs = [Run(a, algo, run_dir=os.path.join(args.runs_dir, n), default_exp_name=default_exp_name,
                             seed_group=group) for a, n in zip(per_seed, names)]
        self.dir = self.runs[0].dir  # --resume of any seed's folder resumes the group
        if self.layout:
            print(f"{len(self.seeds)} seed(s) on {len(self.devices)} devices, the {self.layout} axis split",
                  flush=True)

    @staticmethod
    def _group(run_dir: str) -> list[str]:
        """The folders of the seeds trained with the run in `run_dir` (config.json's seed_group)."""
        path = os.path.join(run_dir, "config.json")
        if not os.path.exists(path):
            sys.exit(f"error: {run_dir!r} is not a run folder (no config.json)")
        with open(path) as f:
            names = json.load(f).get("seed_group")
        if not names:
            return [run_dir]
        dirs = [os.path.join(os.path.dirname(os.path.normpath(run_dir)), n) for n in names]
        for d in dirs:
            if not os.path.exists(os.path.join(d, "config.json")):
                sys.exit(f"error: {run_dir} was trained with the seeds of {', '.join(names)}, and {d} is missing")
        return dirs

    # -- the seed axis on the devices --------------------------------------------------------

    def _shardings(self, tree):
        """Where each leaf lives: split on the seed axis, or on the environment axis of every
        `env_state` (seed axis first, so axis 1), everything else replicated."""
        split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("devices"))
        split_envs = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "devices"))
        whole = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if self.layout == "seeds":
            return jax.tree.map(lambda x: split if np.ndim(x) else whole, tree)

        def envs(x):
            return split_envs if np.ndim(x) >= 2 and np.shape(x)[1] == self.num_envs else whole

        def walk(node):
            if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple: a TrainState, or inside one
                return type(node)(*[jax.tree.map(envs, v) if f == "env_state" else walk(v)
                                    for f, v in zip(node._fields, node)])
            if isinstance(node, (tuple, list)):
                return type(node)(walk(v) for v in node)
            return jax.tree.map(lambda x: whole, node)

        return walk(tree)

    def place(self, tree):
        """`tree` (leading seed axis) on the devices, as `parallel`'s functions expect it."""
        return tree if self.mesh is None else jax.device_put(tree, self._shardings(tree))

    def parallel(self, fn: Callable, in_axes=0, donate_argnums=()) -> Callable:
        """`fn` of one seed, run for all seeds at once: vmapped over the leading seed axis of its
        arguments (`in_axes` as `jax.vmap`'s) and jitted, its outputs kept on the device layout."""
        if len(self.seeds) == 1 and self.mesh is None:
            # One seed: the plain function, its seed axis of length 1 dropped and put back, which
            # compiles MJX as a single run always did (vmap over MJX compiles markedly longer).
            def single(*args):
                axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
                args = [a if axis is None else jax.tree.map(lambda x: x[0], a) for a, axis in zip(args, axes)]
                return jax.tree.map(lambda x: x[None], fn(*args))

            return jax.jit(single, donate_argnums=donate_argnums)
        batched = jax.vmap(fn, in_axes=in_axes)
        if self.mesh is None:
            return jax.jit(batched, donate_argnums=donate_argnums)

        def placed(*args):
            out = batched(*args)
            return jax.lax.with_sharding_constraint(out, self._shardings(out))

        return jax.jit(placed, donate_argnums=donate_argnums)

    def keys(self) -> jax.Array:
        """Each seed's `jax.random.PRNGKey(seed)`, stacked: [num_seeds, 2]."""
        return self.place(jnp.stack([jax.random.PRNGKey(s) for s in self.seeds]))

    def split(self, key: jax.Array, num: int = 2) -> tuple:
        """`jax.random.split` of each seed's key: `num` arrays of [num_seeds, 2]."""
        keys = jax.vmap(lambda k: jax.random.split(k, num))(key)
        return tuple(keys[:, i] for i in range(num))

    # -- each seed's folder ------------------------------------------------------------------

    def timed(self, iterate: Callable, steps_per_iteration: int) -> Callable:
        """`iterate(carry, key) -> (carry, metrics)`, one jitted training iteration of every seed,
        returning its metrics on the host (numpy) and timing it for `log_iteration`. Its first
        call compiles: before it, a notice says what the wait is; after the second, how long
        compiling took."""
        seconds = self._iteration_seconds

        def timed_iterate(carry, key):
            if not seconds:
                print(first_iteration_notice(steps_per_iteration * len(self.seeds)), flush=True)
            t0 = time.time()
            carry, metrics = iterate(carry, key)
            metrics = {k: np.asarray(v, dtype=float) for k, v in jax.device_get(metrics).items()}
            seconds.append(time.time() - t0)
            if len(seconds) == 2 and seconds[0] > 2 * seconds[1]:
                print(f"the first iteration took {seconds[0]:.0f} s, the second {seconds[1]:.0f} s: "
                      f"compilation took about {seconds[0] - seconds[1]:.0f} s", flush=True)
            self._steps_per_second = steps_per_iteration / seconds[-1]  # each seed's
            return carry, metrics

        return timed_iterate

    def log_iteration(self, step: int, metrics: dict, stage: int | None = None) -> None:
        """The row of one training iteration (`timed`'s metrics, with an evaluation's when one
        ran): a NaN loss stops the run, naming where; the iteration's steps per second and the
        stage are added; the progress line follows (always after an evaluation)."""
        where = f"stage {stage}, " if stage is not None else ""
        check_finite({k: v for k, v in metrics.items() if k.startswith("loss/")}, f"{where}step {step:,}")
        stage_field = {"stage": stage} if stage is not None else {}
        metrics = {**metrics, "perf/steps_per_second": self._steps_per_second, **stage_field}
        if "train/episode_return" in metrics:  # NaN until an episode ends: keep the last value
            new = metrics["train/episode_return"]
            self._last_train_return = np.where(np.isfinite(new), new, self._last_train_return)
        evaluated = "eval/return" in metrics
        if evaluated:
            self._last_eval_return = np.asarray(metrics["eval/return"], dtype=float)
        self.log(step, metrics)
        self.progress(step, self.total_steps, self._steps_per_second * len(self.seeds), force=evaluated, **stage_field,
                      train_return=self._last_train_return, eval_return=self._last_eval_return)

    def log(self, step: int, metrics: dict) -> None:
        """One metrics.csv row per seed: seed i gets element i of each per-seed value (a scalar
        goes to every seed)."""
        metrics = {k: np.broadcast_to(np.asarray(v, dtype=float), (len(self.runs),)) for k, v in metrics.items()}
        for i, run in enumerate(self.runs):
            run.log(step, {k: v[i] for k, v in metrics.items()})

    def progress(self, step: int, total: int, sps: float, force: bool = False, **fields) -> None:
        """The progress line; a per-seed value shows as its mean [min, max] over seeds."""
        fields = {k: over_seeds(v, ".2f") if isinstance(v, (jax.Array, np.ndarray)) else v for k, v in fields.items()}
        self.runs[0].progress(step, total, sps, force, **fields)

    def save(self, name: str, tree) -> None:
        """checkpoints/<name> in each seed's folder: its slice of `tree`."""
        for i, run in enumerate(self.runs):
            save_checkpoint(run.checkpoint_path(name), seed_slice(tree, i))

    def load(self, name: str):
        """checkpoints/<name> of every seed, stacked and on the devices."""
        return self.place(stack_seeds([load_checkpoint(r.checkpoint_path(name)) for r in self.runs], name))

    def resume_latest(self) -> dict:
        """--resume of a baseline: every seed's checkpoints/latest.npz, rows after its step dropped."""
        for run in self.runs:
            if not os.path.exists(run.checkpoint_path("latest.npz")):
                sys.exit(f"error: {run.dir} has no checkpoint yet (one is written at every evaluation)")
        checkpoint = self.load("latest.npz")
        step = int(checkpoint["step"])
        for run in self.runs:
            run.forget_after(step)
        print(f"resuming from step {step:,}")
        return checkpoint

    def resume_last_stage(self) -> tuple[int, dict] | None:
        """--resume of a GoRL run: (K, stageK.npz of every seed) for the last stage all seeds
        completed, the rows after it (and its refinement's, which is redone) dropped; None before any."""
        completed = [run.completed_stages() for run in self.runs]
        if not all(completed):
            return None
        last = min(c[-1] for c in completed)
        checkpoint = self.load(f"stage{last}.npz")
        for run in self.runs:
            run.forget_after(checkpoint["step"], refinement_at_step=True)
        print(f"resuming after stage {last} at step {checkpoint['step']:,}")
        return last, checkpoint

    def resume_inside_stage(self) -> dict | None:
        """--resume of a GoRL run stopped inside a stage: every seed's checkpoints/latest.npz
        (written at each evaluation) when it lies in the stage after the last one all seeds
        completed, the rows after its step dropped; None when there is none (resume from the
        last completed stage instead)."""
        paths = [run.checkpoint_path("latest.npz") for run in self.runs]
        if not all(os.path.exists(p) for p in paths):
            return None
        completed = [run.completed_stages() for run in self.runs]
        next_stage = min(c[-1] for c in completed) + 1 if all(completed) else 0
        checkpoint = self.load("latest.npz")
        if checkpoint["stage"] != next_stage:
            return None  # written before the last completed stage ended
        for run in self.runs:
            run.forget_after(checkpoint["step"])
        print(f"resuming inside stage {next_stage} at step {checkpoint['step']:,}")
        return checkpoint

    # -- GoRL's stages: a checkpoint at the end of each, and one at every evaluation inside it -----

    def save_stage(self, state, keys: tuple, stage: int, step: int, key, stage_rows: list) -> None:
        """checkpoints/stage<stage>.npz in each seed's folder: the fields `keys` of the training
        state, the step, the key and the stage table so far. Resuming after it repeats only the
        refinement that follows, from the same key, so the result is the same."""
        self.save(f"stage{stage}.npz", {**{k: getattr(state, k) for k in keys}, "step": step, "key": key,
                                        "stage_rows": stage_rows})

    def save_inside_stage(self, state, keys: tuple, stage: int, step: int, key, stage_rows: list) -> None:
        """checkpoints/latest.npz at an evaluation inside a stage: the fields `keys` (the stage's
        encoder, critic, optimizer state and settings, ...), the environments where they are (the
        arrays of `state.env_state`) and the key, so that a resumed stage trains as the
        uninterrupted one would."""
        self.save("latest.npz", {**{k: getattr(state, k) for k in keys}, "env_state": jax.tree.leaves(state.env_state),
                                 "stage": stage, "step": step, "key": key, "stage_rows": stage_rows})

    def resume_stages(self, state, stage_keys: tuple, resume_keys: tuple = ()):
        """Where `--resume` continues a GoRL run, as (state, step, key, stage_rows, next stage,
        whether that stage is under way): inside the stage it stopped in (latest.npz, with
        `resume_keys` and the environments), else after its last completed stage (stage<K>.npz,
        with `stage_keys`; the refinement after it is then redone); None before any checkpoint."""
        inside = self.resume_inside_stage() if resume_keys else None
        if inside:
            env_state = jax.tree.unflatten(jax.tree.structure(state.env_state), inside["env_state"])
            state = state._replace(**{k: inside[k] for k in resume_keys}, env_state=env_state)
            return state, inside["step"], inside["key"], inside["stage_rows"], inside["stage"], True
        completed = self.resume_last_stage()
        if completed is None:
            return None
        last, saved = completed
        state = state._replace(**{k: saved[k] for k in stage_keys})
        return state, saved["step"], saved["key"], saved["stage_rows"], last + 1, False

    def log_refinement(self, step: int, stage: int, metrics: dict) -> None:
        """The row of a decoder refinement (a NaN stops the run) and its console line."""
        check_finite(metrics, f"decoder refinement before stage {stage}, step {step:,}")
        self.log(step, metrics)
        if "refine/val_best" in metrics:
            fit = (f"validation {over_seeds(metrics['refine/val_initial'], '.4f')} -> "
                   f"{over_seeds(metrics['refine/val_best'], '.4f')} (best at step "
                   f"{over_seeds(metrics['refine/best_step'], ',.0f')}), collection return "
                   f"{over_seeds(metrics['refine/collect_return'])}")
        else:
            fit = f"denoising loss {over_seeds(metrics['refine/loss_final'], '.4f')}"
        print(f"refined decoder before stage {stage}: {fit}, eval return with prior latents "
              f"{over_seeds(metrics['refine/prior_latent_return'])} ({metrics['refine/seconds']:.0f}s)", flush=True)

    def write_stage_table(self, rows: list[dict]) -> None:
        for i, run in enumerate(self.runs):
            if len(self.runs) > 1:
                print(f"seed {self.seeds[i]} ({run.dir}):")
            run.write_stage_table(seed_slice(rows, i))

    def __enter__(self):
        self.started = time.time()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is KeyboardInterrupt:
            print(f"interrupted; resume from the last checkpoint with: python {self.algo}.py --resume {self.dir}",
                  flush=True)
        self.close()
        return False  # the exception goes on

    def finish(self, step: int, stage_rows: list | None = None, final_return=None) -> None:
        """The end of a run: its time, the stage table (GoRL) or final return, the run folders."""
        done = f"done: {step:,} steps in {time.time() - self.started:.0f}s"
        print(done + (f", final evaluation return {over_seeds(final_return)}" if final_return is not None else ""))
        if stage_rows is not None:
            self.write_stage_table(stage_rows)
        for run in self.runs:
            print(f"run folder: {run.dir}")

    def close(self) -> None:
        for run in self.runs:
            run.close()
            if run.new and not run.rows and not os.listdir(os.path.join(run.dir, "checkpoints")):
                # Stopped before its first iteration (an error, Ctrl-C while compiling): nothing to keep.
                shutil.rmtree(run.dir, ignore_errors=True)
                print(f"nothing was trained: removed the empty run folder {run.dir}", flush=True)


def evaluation_due(step: int, steps_per_iteration: int, end_step: int, eval_every: int) -> bool:
    """Whether the iteration that reached `step` is followed by an evaluation: when it crossed a
    multiple of `eval_every` (the global step axis), and after the last iteration before `end_step`."""
    crossed = step // eval_every > (step - steps_per_iteration) // eval_every
    return crossed or step + steps_per_iteration > end_step


# Training steps per second of one iteration on a 2-core CPU without a GPU (README, "On a CPU"):
# about 1k on contact-rich tasks (HopperStand) to 5k on simple ones (CartpoleBalance).
CPU_STEPS_PER_SECOND = (1_000, 5_000)
_cpu_warned = False


def first_iteration_notice(steps_per_iteration: int) -> str:
    """What the wait before the first progress line is; on a CPU with a large iteration, how long
    one iteration will take (once per process)."""
    global _cpu_warned
    notice = "compiling the training iteration and running it once (the first progress line follows it) ..."
    if jax.default_backend() == "cpu" and steps_per_iteration >= 100_000 and not _cpu_warned:
        _cpu_warned = True
        slow, fast = (steps_per_iteration / rate / 60 for rate in CPU_STEPS_PER_SECOND)
        notice += (f"\nnote: JAX runs on the CPU, and one iteration is {steps_per_iteration:,} environment steps: "
                   f"on a small CPU that takes about {fast:.0f}-{slow:.0f} min per iteration (MJX steps 1k-5k per "
                   "second there, by task), plus compilation. The README's 'On a CPU' commands learn in minutes; "
                   "the paper's settings want a GPU (README, 'On a GPU').")
    return notice


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_finite(metrics: dict, where: str) -> None:
    """Stop the run on a NaN/inf loss, naming where it happened (callers checkpoint before)."""
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(bad)} at {where}; the last good checkpoint is kept")
