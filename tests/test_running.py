"""Tests of running.py: the flags (choices, per-stage values, task settings), the separation of
the running from the algorithm files, the run folder and its lifecycle, checkpoints, the
training loop's schedule and logging, and the settings a GPU run needs. (Seeds and devices:
test_seeds.py; resuming: test_resume.py.)"""

import ast
import csv
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro

import common
import dppo
import fpo
import gorl_diffusion
import gorl_fm
import gorl_sac
import ppo
import running

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"ppo": ppo, "fpo": fpo, "dppo": dppo, "gorl_fm": gorl_fm, "gorl_diffusion": gorl_diffusion,
           "gorl_sac": gorl_sac}


@dataclasses.dataclass
class ChoiceArgs:
    mode: Literal["a", "b"] = "a"
    optional: Literal["x", "y"] | None = None
    free: str = "anything"
    staged: tuple[Literal["p", "q"], ...] | None = None
    rates: tuple[float, ...] = (1.0,)


def test_choice_checks_name_the_flag_and_its_choices():
    assert all(ok for ok, _ in running.choice_checks(ChoiceArgs()))
    assert all(ok for ok, _ in running.choice_checks(ChoiceArgs(mode="b", optional="y", staged=("q", "p"))))
    failed = [m for ok, m in running.choice_checks(ChoiceArgs(mode="c", optional="z", free="?", staged=("p", "r")))
              if not ok]
    assert failed == ["--mode must be one of a, b, got 'c'", "--optional must be one of x, y, got 'z'",
                      "--staged must be one of p, q, got 'r'"]
    assert not running.choice_checks(ChoiceArgs(staged=()))[-1][0]  # a per-stage flag needs a value


def test_ppo_layout_checks_name_exactly_the_flags_that_are_not_positive():
    failed = lambda **bad: [m for ok, m in running.ppo_layout_checks(dataclasses.replace(ppo.Args(), **bad)) if not ok]
    assert failed() == []
    assert failed(num_epochs=0, eval_every=-1) == ["--num-epochs, --eval-every must be positive"]
    assert failed(episode_length=0) == ["--episode-length must be positive"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_choice_flag_is_a_literal_that_tyro_and_validate_refuse(name, capsys):
    module = SCRIPTS[name]
    hints = __import__("typing").get_type_hints(module.Args)
    choices = {f: h for f, h in hints.items() if "Literal" in str(h)}
    assert {"impl", "matmul_precision"} <= set(choices)  # and each script's own
    with pytest.raises(SystemExit) as refused:
        tyro.cli(module.Args, args=["--impl", "cuda"])
    assert refused.value.code != 0 and "cuda" in capsys.readouterr().err
    for field in choices:
        with pytest.raises(SystemExit, match=f"--{field.replace('_', '-')} must be one of"):
            module.validate(dataclasses.replace(module.Args(env_name="CartpoleBalance"), **{field: "no-such-choice"}))


def test_per_stage_values_hold_their_last_value():
    assert [running.per_stage((0.15, 0.3), m) for m in range(4)] == [0.15, 0.3, 0.3, 0.3]
    assert [running.per_stage((7,), m) for m in range(3)] == [7, 7, 7]


@pytest.mark.parametrize("module", [gorl_fm, gorl_diffusion], ids=lambda m: m.__name__)
def test_per_stage_flags_reach_the_stage_hyperparameters(module):
    args = module.resolve(module.Args(env_name="CartpoleBalance", learning_rate=(1e-3, 2e-4), clip_eps=(0.1, 0.2, 0.4),
                                      max_grad_norm=(0.5,), kl_beta=(1e-4, 2e-4, 3e-4, 4e-4), ent_coef=(0.02, 0.0),
                                      normalizer_update=("before", "after"), normalizer_variance=("running", "batch")))
    hp = [module.stage_hyperparameters(args, m) for m in range(4)]
    assert [float(h["learning_rate"]) for h in hp] == pytest.approx([1e-3, 2e-4, 2e-4, 2e-4])
    assert [float(h["clip_eps"]) for h in hp] == pytest.approx([0.1, 0.2, 0.4, 0.4])
    assert [float(h["max_grad_norm"]) for h in hp] == pytest.approx([0.5] * 4)
    assert [float(h["kl_beta"]) for h in hp] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    assert [float(h["ent_coef"]) for h in hp] == pytest.approx([0.02, 0.0, 0.0, 0.0])
    assert [float(h["normalizer_before"]) for h in hp] == [1.0, 0.0, 0.0, 0.0]
    assert [float(h["normalizer_keep_variance"]) for h in hp] == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(SystemExit, match="--clip-eps needs one or more values"):
        module.validate(dataclasses.replace(args, clip_eps=()))


def test_task_settings_precedence_script_then_shared_then_defaults_and_the_command_line_wins():
    @dataclasses.dataclass
    class A:
        env_name: str = "FingerSpin"
        discount: float | None = None
        width: int | None = None
        depth: int | None = 3

    own = {"FingerSpin": {"width": 64}}
    defaults = {"discount": 0.995, "width": 128, "depth": 2}
    resolved = running.resolve_task_settings(A(), own, defaults)
    assert (resolved.discount, resolved.width, resolved.depth) == (0.95, 64, 3)  # shared table, own table, given
    assert running.resolve_task_settings(A(env_name="CheetahRun"), own, defaults).width == 128
    assert running.resolve_task_settings(A(discount=0.9), own, defaults).discount == 0.9


def test_validate_takes_flags_as_given_or_resolved_in_every_script():
    """One convention: `validate` checks task-dependent flags at the task's value either way."""
    for module in SCRIPTS.values():
        args = module.Args(env_name="Hopper" if module is gorl_sac else "CartpoleBalance")
        module.validate(args)
        module.validate(module.resolve(args))


def names_in_code(path):
    """Every identifier, attribute and string constant in a module's code (not its comments)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(node.value.replace(".", " ").replace(":", " ").split())
    return found


@pytest.mark.parametrize("shared", ["common.py", "running.py"])
def test_the_shared_modules_name_no_algorithm_file(shared):
    """An algorithm file and its shared modules can be copied alone: nothing in common.py or
    running.py refers to ppo, fpo, dppo, gorl_fm, gorl_diffusion or gorl_sac (their task values
    live in their own files, each passes its own name)."""
    assert not names_in_code(os.path.join(REPO, shared)) & set(SCRIPTS)


def test_algorithm_files_import_only_the_shared_modules():
    for name in SCRIPTS:
        tree = ast.parse(open(os.path.join(REPO, f"{name}.py")).read())
        imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for a in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & (set(SCRIPTS) - {name}), name
        assert {"common", "running"} <= imported


class Foreign(NamedTuple):
    x: jnp.ndarray


def test_checkpoints_rebuild_namedtuples_only_from_the_normalizer_and_optax(tmp_path):
    path = str(tmp_path / "c.npz")
    running.save_checkpoint(path, {"norm": common.normalizer_init(3)})
    assert isinstance(running.load_checkpoint(path)["norm"], common.Normalizer)
    running.save_checkpoint(path, {"state": Foreign(jnp.ones(2))})  # writing is fine; reading refuses
    with pytest.raises(SystemExit, match="may not name"):
        running.load_checkpoint(path)


@dataclasses.dataclass
class TinyArgs(running.RunFlags):
    env_name: str = "CartpoleBalance"
    seed: int = 3
    num_envs: int = 4


def test_a_run_interrupted_says_how_to_resume_and_keeps_no_empty_folder(tmp_path, capsys):
    runs = running.Runs(TinyArgs(runs_dir=str(tmp_path)), "gorl_fm", total_steps=10)
    with pytest.raises(KeyboardInterrupt):
        with runs:
            raise KeyboardInterrupt
    out = capsys.readouterr().out
    assert f"resume from the last checkpoint with: python gorl_fm.py --resume {runs.dir}" in out
    assert not glob.glob(str(tmp_path / "*"))  # nothing was trained: the empty folder is removed
    runs = running.Runs(TinyArgs(runs_dir=str(tmp_path)), "ppo", total_steps=10)
    with runs:
        runs.log(10, {"x": 1.0})
    runs.finish(10, final_return=jnp.array([5.0]))
    out = capsys.readouterr().out
    assert "done: 10 steps in" in out and "final evaluation return 5.0" in out and runs.dir in out
    assert os.path.exists(os.path.join(runs.dir, "metrics.csv"))


# ---------------------------------------------------------------------------------------------
# Run folder, checkpoints, NaN check
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeArgs:
    env_name: str = "CartpoleBalance"
    seed: int = 7
    runs_dir: str = "runs"
    hidden: tuple[int, ...] = (4, 4)
    exp_name: str | None = None


def read_csv(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_run_folder_config_csv_tensorboard(tmp_path):
    t0 = time.time()
    run = running.Run(FakeArgs(runs_dir=str(tmp_path)), "algo")
    assert os.path.dirname(run.dir) == str(tmp_path)
    assert os.path.basename(run.dir).startswith("CartpoleBalance__algo__7__")
    with open(os.path.join(run.dir, "config.json")) as f:
        config = json.load(f)
    assert config == {"algo": "algo", "env_name": "CartpoleBalance", "seed": 7, "runs_dir": str(tmp_path),
                      "hidden": [4, 4], "exp_name": "algo"}

    run.log(10, {"loss/a": 1.5})
    run.log(20, {"loss/a": 2.5, "eval/return": 7.0})  # a new column rewrites the header
    run.log(30, {"loss/a": jnp.float32(3.5)})  # appended under the wider header
    run.log(40, {"loss/a": float("nan"), "eval/return": 9.0})
    header, rows = read_csv(run.csv_path)
    assert header == ["step", "wall_time", "loss/a", "eval/return"]
    assert [r["step"] for r in rows] == ["10", "20", "30", "40"]
    assert [r["loss/a"] for r in rows] == ["1.5", "2.5", "3.5", "nan"]
    assert [r["eval/return"] for r in rows] == ["", "7.0", "", "9.0"]
    # Seconds since the run started: in order, and within the time this test has taken.
    wall = [float(r["wall_time"]) for r in rows]
    assert wall == sorted(wall) and 0 <= wall[0] and wall[-1] <= time.time() - t0 + 0.01
    events = glob.glob(os.path.join(run.dir, "tb", "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 0
    run.close()

    # Reopening the folder (as --resume does) keeps config and rows; forget_after drops later rows.
    args_changed = FakeArgs(runs_dir=str(tmp_path), seed=8)
    again = running.Run(args_changed, "algo", run_dir=run.dir)
    with open(os.path.join(run.dir, "config.json")) as f:
        assert json.load(f)["seed"] == 7
    again.forget_after(20)
    header, rows = read_csv(again.csv_path)
    assert header == ["step", "wall_time", "loss/a", "eval/return"]
    assert [(r["step"], r["loss/a"], r["eval/return"]) for r in rows] == [("10", "1.5", ""), ("20", "2.5", "7.0")]
    again.log(30, {"loss/a": 4.5, "eval/return": 1.0})
    again.log(40, {"loss/a": 5.5, "new": 2.0})
    header, rows = read_csv(again.csv_path)
    assert header == ["step", "wall_time", "loss/a", "eval/return", "new"]
    assert [(r["step"], r["loss/a"], r["eval/return"], r["new"]) for r in rows] == [
        ("10", "1.5", "", ""), ("20", "2.5", "7.0", ""), ("30", "4.5", "1.0", ""), ("40", "5.5", "", "2.0")
    ]
    # A GoRL stage ends at step 40; its refinement logs at the same step and is redone on resume.
    again.log(40, {"refine/loss_final": 0.3})
    again.log(50, {"loss/a": 6.5})
    again.forget_after(40, refinement_at_step=True)
    header, rows = read_csv(again.csv_path)
    assert [(r["step"], r["loss/a"]) for r in rows] == [("10", "1.5"), ("20", "2.5"), ("30", "4.5"), ("40", "5.5")]
    again.close()


def test_experiment_name_names_the_run_folder(tmp_path):
    """--exp-name wins over a script's ablation name, which wins over the algorithm's name."""
    ablation = running.Run(FakeArgs(runs_dir=str(tmp_path)), "algo", default_exp_name="algo_frozen_decoder")
    named = running.Run(FakeArgs(runs_dir=str(tmp_path), exp_name="sweep-lr3"), "algo", default_exp_name="algo_x")
    for run, name in ((ablation, "algo_frozen_decoder"), (named, "sweep-lr3")):
        run.close()
        assert os.path.basename(run.dir).startswith(f"CartpoleBalance__{name}__7__")
        with open(os.path.join(run.dir, "config.json")) as f:
            config = json.load(f)
        assert (config["algo"], config["exp_name"]) == ("algo", name)
    with pytest.raises(SystemExit, match="exp-name"):
        running.Run(FakeArgs(runs_dir=str(tmp_path), exp_name="a/b"), "algo")


@dataclasses.dataclass
class TrackedArgs(FakeArgs):
    track: bool = True
    wandb_project: str = "gorl-tests"
    wandb_entity: str | None = None


def test_track_without_wandb_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(SystemExit, match="pip install wandb"):
        running.Run(TrackedArgs(runs_dir=str(tmp_path)), "algo")


def test_track_mirrors_metrics_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (it is optional: pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = running.Run(TrackedArgs(runs_dir=str(tmp_path)), "algo")
    run.log(10, {"loss/a": 1.5, "eval/return": 7.0})
    run.close()
    assert glob.glob(os.path.join(run.dir, "wandb", "offline-run-*", "*.wandb"))


def test_args_from_run(tmp_path):
    run = running.Run(FakeArgs(runs_dir=str(tmp_path), seed=3), "algo")
    run.close()
    args = running.args_from_run(FakeArgs, run.dir, env_name="Other")
    assert args == FakeArgs(env_name="Other", seed=3, runs_dir=str(tmp_path), hidden=(4, 4), exp_name="algo")
    with pytest.raises(SystemExit, match="not a run folder"):
        running.args_from_run(FakeArgs, str(tmp_path / "missing"))


def test_a_run_from_before_a_flag_became_per_stage_resumes_with_it_in_every_stage(tmp_path):
    """GoRL's ent_coef was one number before it became per stage: an older config.json's value
    holds for every stage."""
    args = gorl_diffusion.Args(env_name="CartpoleBalance", runs_dir=str(tmp_path))
    run = running.Run(args, "gorl_diffusion")
    run.close()
    path = os.path.join(run.dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(config, ent_coef=0.02, vf_coef=0.5, normalizer_update="before"), f)
    resumed = running.args_from_run(gorl_diffusion.Args, run.dir)
    assert resumed.ent_coef == (0.02,) and resumed.vf_coef == 0.5  # a plain float flag stays a float
    assert resumed.normalizer_update == ("before",) and resumed.env_name == "CartpoleBalance"
    assert float(gorl_diffusion.stage_hyperparameters(gorl_diffusion.resolve(resumed), 3)["ent_coef"]) == pytest.approx(0.02)


def test_checkpoint_round_trip(tmp_path):
    tree = {
        "params": [{"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}],
        "norm": common.Normalizer(jnp.float32(5.0), jnp.arange(3.0), jnp.full(3, 2.0)),
        "step": 1234,
        "key": jax.random.PRNGKey(9),
    }
    path = str(tmp_path / "checkpoints" / "latest.npz")
    running.save_checkpoint(path, tree)
    assert os.listdir(tmp_path / "checkpoints") == ["latest.npz"]  # no temporary file left
    loaded = running.load_checkpoint(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    assert isinstance(loaded["norm"], common.Normalizer)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        if isinstance(b, jax.Array):
            assert isinstance(a, jax.Array) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert int(loaded["step"]) == 1234
    running.save_checkpoint(path, {"step": 1})  # overwrites
    assert int(running.load_checkpoint(path)["step"]) == 1


def test_checkpoint_round_trips_optimizer_states_and_python_values_bit_for_bit(tmp_path):
    params = {"w": jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float32), "layers": [{"b": jnp.ones(2)}]}
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=3e-4)
    grads = jax.tree.map(lambda x: 0.1 * x + 0.3, params)
    opt_state = adam.update(grads, adam.init(params), params)[1]  # non-trivial moments
    tree = {"opt": opt_state, "injected": injected.init(params), "rows": [{"stage": 0, "return": float("nan")}],
            "flags": (True, None, "x"), "key": jax.random.PRNGKey(3), "step": 2**40}
    path = str(tmp_path / "c.npz")
    running.save_checkpoint(path, tree)
    loaded = running.load_checkpoint(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    assert type(loaded["opt"][1][0]) is type(opt_state[1][0])  # optax's own state classes
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded["step"] == 2**40 and loaded["flags"] == (True, None, "x") and math.isnan(loaded["rows"][0]["return"])
    # The state still works with the optimizer it came from.
    adam.update(grads, loaded["opt"], params)


def test_a_damaged_or_foreign_checkpoint_is_a_clear_error_and_runs_no_code(tmp_path):
    import pickle

    path = str(tmp_path / "c.npz")
    running.save_checkpoint(path, {"w": jnp.arange(1000.0), "norm": common.normalizer_init(3)})
    data = open(path, "rb").read()
    cases = {"truncated": data[: len(data) // 2], "empty": b"", "pickle": pickle.dumps({"w": 1})}
    # An altered structure naming a class outside the project and optax (what a pickle could run).
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    tree = arrays["__tree__"].tobytes().decode().replace("common:Normalizer", "os:system")
    arrays["__tree__"] = np.frombuffer(tree.encode(), np.uint8)
    np.savez(str(tmp_path / "altered.npz"), **arrays)
    cases["altered"] = open(tmp_path / "altered.npz", "rb").read()
    for name, content in cases.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(content)
        with pytest.raises(SystemExit, match="is not a readable checkpoint") as exc:
            running.load_checkpoint(str(bad))
        assert str(bad) in str(exc.value), name
    with pytest.raises(SystemExit, match="does not exist"):
        running.load_checkpoint(str(tmp_path / "missing.npz"))


@dataclasses.dataclass
class SeedsArgs(FakeArgs):
    num_seeds: int = 2
    num_envs: int = 4
    resume: str | None = None


class FakeTraining:
    """`iterate` / `evaluate` / `on_eval` of a training loop, without any environment: the carry
    is one counter per seed (seed i's starts at 100 i)."""

    def __init__(self, nan_at=None):
        self.nan_at, self.calls, self.evals, self.saved, self.keys = nan_at, 0, [], [], []

    def iterate(self, carry, key):
        self.calls += 1
        self.keys.append(np.asarray(key))
        loss = float("nan") if self.calls == self.nan_at else 1.0 / self.calls
        return carry + 1, {"loss/total": jnp.full(carry.shape, loss), "train/episode_return": carry.astype(float)}

    def evaluate(self, carry, key):
        self.evals.append(int(carry[0]))
        return {"eval/return": 10.0 * carry, "eval/episode_length": carry.astype(float)}

    def on_eval(self, carry, step, key):
        self.saved.append((int(carry[0]), step))


def train_loop(runs, iterate, carry, key, step, end_step, per_iter, eval_every, evaluate, on_eval=None, stage=None):
    """The loop every algorithm file's main() runs (ppo.py's, gorl_fm.py's latent PPO)."""
    while step + per_iter <= end_step:
        key, k_iter, k_eval = runs.split(key, 3)
        carry, metrics = iterate(carry, k_iter)
        step += per_iter
        evaluating = running.evaluation_due(step, per_iter, end_step, eval_every)
        if evaluating:
            metrics.update(jax.device_get(evaluate(carry, k_eval)))
        runs.log_iteration(step, metrics, stage)
        if evaluating and on_eval:
            on_eval(carry, step, key)
    return carry, step, metrics


def test_training_loop_schedule_logging_and_progress(tmp_path, capsys):
    runs = running.Runs(SeedsArgs(runs_dir=str(tmp_path)), "algo", total_steps=65)
    assert runs.seeds == [7, 8] and runs.layout is None
    fake = FakeTraining()
    iterate = runs.timed(fake.iterate, 10)
    carry, step, metrics = train_loop(runs, iterate, jnp.array([0, 100]), runs.keys(), 0, 65, 10, 25,
                                      fake.evaluate, fake.on_eval, stage=1)
    assert step == 60 and list(carry) == [6, 106] and list(metrics["eval/return"]) == [60.0, 1060.0]
    assert isinstance(metrics["loss/total"], np.ndarray)  # `timed` brings the metrics to the host
    # Each seed's keys are those a run of that seed alone splits off: seed + 1's are not seed's.
    assert fake.keys[0].shape == (2, 2)
    for i, seed in enumerate(runs.seeds):
        np.testing.assert_array_equal(fake.keys[0][i], jax.random.split(jax.random.PRNGKey(seed), 3)[1])
    # Evaluations where the step crosses a multiple of 25, and after the last iteration.
    assert fake.saved == [(3, 30), (5, 50), (6, 60)] and fake.evals == [3, 5, 6]
    # The next stage runs the same timed function: no second compile notice.
    carry, step, _ = train_loop(runs, iterate, carry, runs.keys(), 60, 80, 10, 25, fake.evaluate, stage=2)
    runs.close()
    assert step == 80
    for run, offset in zip(runs.runs, (0, 1000)):
        assert os.path.basename(run.dir).startswith(f"CartpoleBalance__algo__{7 + offset // 1000}__")
        rows = read_csv(run.csv_path)[1]
        assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60, 70, 80]
        assert [r["eval/return"] for r in rows] == ["", "", *[f"{offset + 10 * c}.0" if c in (3, 5, 6, 8) else ""
                                                            for c in (3, 4, 5, 6, 7, 8)]]
        assert [float(r["loss/total"]) for r in rows] == pytest.approx([1 / i for i in range(1, 9)])
        assert [r["stage"] for r in rows] == ["1.0"] * 6 + ["2.0"] * 2
        assert all(float(r["perf/steps_per_second"]) > 0 for r in rows)
        with open(os.path.join(run.dir, "config.json")) as f:
            config = json.load(f)
        assert config["seed"] == 7 + offset // 1000 and config["num_seeds"] == 2
        assert config["seed_group"] == [os.path.basename(r.dir) for r in runs.runs]
    out = capsys.readouterr().out
    # The progress line: the mean over seeds, then [min, max].
    assert "step 60/65" in out and "eval_return 560.00 [60.00, 1060.00]" in out and "stage 1" in out
    assert out.count("compiling the training iteration") == 1
    runs = running.Runs(SeedsArgs(runs_dir=str(tmp_path / "again"), num_seeds=1), "algo", total_steps=20)
    train_loop(runs, runs.timed(fake.iterate, 10), jnp.array([0]), runs.keys(), 0, 20, 10, 25, fake.evaluate)
    runs.close()
    out = capsys.readouterr().out
    assert "eval_return 20.00 |" in out  # one seed: the plain value


def test_evaluation_due_at_each_crossed_multiple_and_after_the_last_iteration():
    due = [s for s in range(10, 91, 10) if running.evaluation_due(s, 10, 95, 25)]  # the steps a loop to 95 reaches
    assert due == [30, 50, 80, 90]  # 90: the last whole iteration before 95
    assert [s for s in range(30, 121, 30) if running.evaluation_due(s, 30, 120, 60)] == [60, 120]


def test_first_iteration_notice_estimates_a_large_iteration_on_the_cpu(monkeypatch):
    # The backend as the notice sees it, so that the test means the same on a GPU machine.
    monkeypatch.setattr(common.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(running, "_cpu_warned", False)
    assert "note:" not in running.first_iteration_notice(983_040)  # a GPU needs no warning
    monkeypatch.setattr(common.jax, "default_backend", lambda: "cpu")
    notice = running.first_iteration_notice(983_040)
    assert "983,040 environment steps" in notice and "3-16 min per iteration" in notice and "On a CPU" in notice
    assert "note:" not in running.first_iteration_notice(983_040)  # once per process
    monkeypatch.setattr(running, "_cpu_warned", False)
    assert "note:" not in running.first_iteration_notice(7_680)  # a CPU-sized iteration needs no warning


def test_training_loop_stops_on_nan_and_keeps_the_last_checkpoint(tmp_path):
    runs = running.Runs(SeedsArgs(runs_dir=str(tmp_path), num_seeds=1), "algo", total_steps=100)
    fake = FakeTraining(nan_at=3)
    with pytest.raises(FloatingPointError, match="loss/total.*stage 2, step 30"):
        train_loop(runs, runs.timed(fake.iterate, 10), jnp.array([0]), runs.keys(), 0, 100, 10, 10,
                   fake.evaluate, fake.on_eval, stage=2)
    runs.close()
    assert fake.saved == [(1, 10), (2, 20)]  # nothing saved after the NaN
    assert [int(r["step"]) for r in read_csv(runs.runs[0].csv_path)[1]] == [10, 20]


def test_check_finite_names_the_loss_and_place():
    running.check_finite({"loss/a": 1.0, "loss/b": np.float32(-2.0)}, "step 10")
    with pytest.raises(FloatingPointError) as error:
        running.check_finite({"loss/ok": 1.0, "loss/value": float("nan"), "loss/policy": np.inf}, "stage 2, step 1,000")
    message = str(error.value)
    assert "loss/value" in message and "loss/policy" in message and "loss/ok" not in message
    assert "stage 2, step 1,000" in message


# ---------------------------------------------------------------------------------------------
# Settings a GPU run needs
# ---------------------------------------------------------------------------------------------


def test_gpu_settings_are_defaults_that_the_user_overrides(monkeypatch):
    import importlib.util

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a CPU-only jaxlib
    running._gpu_settings()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"  # no GPU flag for the CPU
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: name == "jax_cuda12_plugin" or None)
    running._gpu_settings()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_gpu_triton_gemm_any=True"
    running._gpu_settings()  # not twice
    assert os.environ["XLA_FLAGS"].count("triton") == 1
    # The user's values win.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_triton_gemm_any=False")
    running._gpu_settings()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_triton_gemm_any=False"


def test_the_scripts_set_them_before_jax_starts():
    """In a fresh process the setting is there once the script's modules are imported."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    out = subprocess.run([sys.executable, "-c", "import os, gorl_fm; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "false"


def test_matmul_precision_is_the_tasks_and_is_applied(monkeypatch):
    import dppo
    import fpo
    import gorl_diffusion
    import gorl_fm
    import gorl_sac
    import ppo

    for module in (ppo, fpo, dppo, gorl_fm, gorl_diffusion, gorl_sac):
        assert module.resolve(module.Args(env_name="HumanoidRun")).matmul_precision == "highest", module
        assert module.resolve(module.Args(env_name="CheetahRun")).matmul_precision == "default", module
        assert module.resolve(module.Args(env_name="HumanoidRun", matmul_precision="high")).matmul_precision == "high"
    with pytest.raises(SystemExit, match="--matmul-precision must be one of"):
        ppo.validate(ppo.Args(matmul_precision="tf32"))
    monkeypatch.setenv("GORL_COMPILATION_CACHE", "0")
    before = jax.config.jax_default_matmul_precision
    try:
        running.start_runtime(ppo.resolve(ppo.Args(env_name="HumanoidRun")))
        assert jax.config.jax_default_matmul_precision == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def test_compilation_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("GORL_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert running.compilation_cache_dir("gpu") == str(tmp_path / "gorl" / "jax")
    assert running.compilation_cache_dir("cpu") is None  # XLA:CPU warns at length about cached programs
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
    assert running.compilation_cache_dir("cpu") == "/somewhere"
    monkeypatch.setenv("GORL_COMPILATION_CACHE", "0")
    assert running.compilation_cache_dir("gpu") is None


def test_the_reading_path_of_gorl_fm_stays_short():
    """gorl_fm.py plus the definitions of common.py it uses (README: 642 code lines); what
    running.py holds is not on it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reading_path", os.path.join(REPO, "benchmarks", "reading_path.py"))
    reading_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reading_path)
    own, shared, names = reading_path.reading_path("gorl_fm")
    assert own + shared <= 660, (own, shared)
    assert {"gae", "rollout", "minibatch_sgd", "fit_keep_best", "make_evaluator", "normalizer_update"} <= set(names)
    # A docstring or comment does not count; a line of code does.
    assert reading_path.code_lines('"""doc"""\n# note\n\nx = 1\ndef f():\n    """doc"""\n    return x\n') == {4, 5, 7}
