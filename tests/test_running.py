"""Tests of running.py's conventions: the flags (choices, per-stage values, task settings), the
separation of the running from the algorithm files, and the run's lifecycle. (The run folder,
checkpoints and seeds are tested in test_common.py and test_seeds.py.)"""

import ast
import dataclasses
import glob
import os
from typing import Literal, NamedTuple

import jax.numpy as jnp
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


def test_choice_checks_name_the_flag_and_its_choices():
    assert all(ok for ok, _ in running.choice_checks(ChoiceArgs()))
    assert all(ok for ok, _ in running.choice_checks(ChoiceArgs(mode="b", optional="y")))
    failed = [m for ok, m in running.choice_checks(ChoiceArgs(mode="c", optional="z", free="?")) if not ok]
    assert failed == ["--mode must be one of a, b, got 'c'", "--optional must be one of x, y, got 'z'"]


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
                                      max_grad_norm=(0.5,), kl_beta=(1e-4, 2e-4, 3e-4, 4e-4)))
    hp = [module.stage_hyperparameters(args, m) for m in range(4)]
    assert [float(h["learning_rate"]) for h in hp] == pytest.approx([1e-3, 2e-4, 2e-4, 2e-4])
    assert [float(h["clip_eps"]) for h in hp] == pytest.approx([0.1, 0.2, 0.4, 0.4])
    assert [float(h["max_grad_norm"]) for h in hp] == pytest.approx([0.5] * 4)
    assert [float(h["kl_beta"]) for h in hp] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
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
