"""plot.py: curves from run folders, the PC1 projection and the KDE of the density figure, videos."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from PIL import Image

import common
import running
import gorl_fm
import plot
import ppo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass
class FakeArgs:
    env_name: str = "CartpoleBalance"
    seed: int = 1
    runs_dir: str = "runs"
    plain_sac: bool = False


def fake_run(root, algo, seed, staged, offset=0.0, exp_name=None, plain_sac=False):
    """A run folder written by running.Run, with the rows the scripts log."""
    run = running.Run(FakeArgs(seed=seed, runs_dir=str(root), plain_sac=plain_sac), algo,
                     run_dir=os.path.join(root, f"CartpoleBalance__{exp_name or algo}__{seed}"),
                     default_exp_name=exp_name)
    for i in range(1, 9):
        step = i * 1000
        metrics = {"loss/total": 1.0 / i, "train/episode_return": 10.0 * i, "perf/steps_per_second": 500.0}
        if staged:
            metrics["stage"] = 0 if i <= 4 else 1
        if i % 2 == 0:
            metrics["eval/return"] = 100.0 * i + offset
        run.log(step, metrics)
        if staged and i == 4:
            run.log(step, {"refine/loss_final": 0.1, "refine/prior_latent_return": 300.0})
    run.close()
    return run.dir


@pytest.fixture
def run_dirs(tmp_path):
    return [fake_run(tmp_path, "ppo", 1, False, 0.0), fake_run(tmp_path, "ppo", 2, False, 20.0),
            fake_run(tmp_path, "gorl_fm", 1, True, 5.0), fake_run(tmp_path, "gorl_fm", 2, True, -5.0)]


def test_curves_png_from_run_folders(run_dirs, tmp_path):
    out = str(tmp_path / "figs" / "curves.png")
    plot.plot_curves(run_dirs, out)
    assert os.path.getsize(out) > 1000
    assert open(out, "rb").read(8) == PNG_MAGIC
    # The CLI draws the same figure.
    out2 = str(tmp_path / "curves_cli.png")
    plot.main(["curves", *run_dirs, "--out", out2, "--metric", "train/episode_return"])
    assert os.path.getsize(out2) > 1000


def test_grouping_mean_std_and_stage_boundaries(run_dirs):
    runs = [plot.load_run(d) for d in run_dirs]
    groups = plot.group_runs(runs)
    assert sorted(groups) == [("CartpoleBalance", "gorl_fm"), ("CartpoleBalance", "ppo")]
    steps, values = plot.metric_curve(groups[("CartpoleBalance", "ppo")][0]["rows"])
    np.testing.assert_array_equal(steps, [2000, 4000, 6000, 8000])
    np.testing.assert_array_equal(values, [200, 400, 600, 800])
    grid, mean, std = plot.mean_std_on_grid([plot.metric_curve(r["rows"]) for r in groups[("CartpoleBalance", "ppo")]])
    assert grid[0] == 2000 and grid[-1] == 8000
    np.testing.assert_allclose(mean, 100.0 * grid / 1000 + 10.0)  # seeds at +0 and +20
    np.testing.assert_allclose(std, 10.0)
    # The stage column changes after step 4000 (refinement rows have no stage).
    assert plot.stage_boundaries(groups[("CartpoleBalance", "gorl_fm")][0]["rows"]) == [4000.0]
    assert plot.stage_boundaries(groups[("CartpoleBalance", "ppo")][0]["rows"]) == []


def test_ablations_are_grouped_apart_from_their_method(run_dirs, tmp_path):
    ablation = fake_run(tmp_path, "gorl_fm", 1, True, exp_name="gorl_fm_frozen_decoder")
    groups = plot.group_runs([plot.load_run(d) for d in [*run_dirs, ablation]])
    assert sorted(name for _, name in groups) == ["gorl_fm", "gorl_fm_frozen_decoder", "ppo"]
    assert len(groups[("CartpoleBalance", "gorl_fm")]) == 2


@pytest.mark.parametrize("algo, plain_sac, exp_name", [("gorl_sac", True, "sac_plain"), ("fpo", False, None)])
def test_density_of_a_run_it_cannot_draw_says_why(tmp_path, capsys, algo, plain_sac, exp_name):
    run_dir = fake_run(tmp_path, algo, 1, False, exp_name=exp_name, plain_sac=plain_sac)
    with pytest.raises(SystemExit) as exc:
        plot.main(["density", run_dir, "--out", str(tmp_path / "d.png")])
    message = str(exc.value)
    assert f"is a run of {exp_name or algo};" in message and "ppo.py, gorl_fm.py, gorl_diffusion.py" in message
    with pytest.raises(SystemExit, match="not a run folder"):
        plot.load_policy(str(tmp_path / "nowhere"), None)


def test_mean_std_interpolates_onto_a_common_grid():
    a = (np.array([0.0, 10.0]), np.array([0.0, 10.0]))
    b = (np.array([0.0, 5.0, 10.0]), np.array([0.0, 0.0, 0.0]))
    grid, mean, std = plot.mean_std_on_grid([a, b], num_points=3)
    np.testing.assert_array_equal(grid, [0.0, 5.0, 10.0])
    np.testing.assert_allclose(mean, [0.0, 2.5, 5.0])
    np.testing.assert_allclose(std, [0.0, 2.5, 5.0])


def anisotropic_samples(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    cov_root = rng.normal(size=(3, 3)) * np.array([3.0, 1.0, 0.3])
    return rng.normal(size=(n, 3)) @ cov_root.T + np.array([1.0, -2.0, 0.5])


def test_pca_projection_matches_numpy_svd_and_covariance_eigenvector():
    x = anisotropic_samples()
    p = plot.pca_project(x)
    centered = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(centered, full_matrices=False)
    reference = u[:, 0] * s[0]  # sklearn's PCA(1).fit_transform, up to sign
    sign = np.sign(p @ reference)
    np.testing.assert_allclose(p, sign * reference, atol=1e-8)
    # The same axis as the top eigenvector of the sample covariance.
    w, v = np.linalg.eigh(np.cov(x.T))
    np.testing.assert_allclose(np.abs(p), np.abs(centered @ v[:, -1]), atol=1e-6)
    # Centered, and its variance is the largest eigenvalue.
    assert abs(p.mean()) < 1e-9
    np.testing.assert_allclose(p.var(ddof=1), w[-1], rtol=1e-9)
    # Deterministic sign: flipping the data's orientation does not flip the projection's convention.
    _, axis = plot.pca_direction(x)
    assert axis[np.argmax(np.abs(axis))] > 0
    # One-dimensional actions: PC1 is the centered action itself.
    one = np.random.default_rng(1).normal(size=(100, 1))
    np.testing.assert_allclose(plot.pca_project(one), one[:, 0] - one.mean())


def test_kde_matches_scipy_gaussian_kde_with_bandwidth_factor_0_8():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2.0, 0.5, 3000), rng.normal(1.5, 1.0, 7000)])
    grid = np.linspace(-5, 6, 301)
    ours = plot.kde(x, grid, 0.8)
    reference = scipy.stats.gaussian_kde(x, bw_method=0.8)(grid)
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12)
    # A density: it integrates to one (on a grid wide enough for the kernel's tails).
    wide = np.linspace(-15, 15, 3001)
    assert abs(np.trapezoid(plot.kde(x, wide, 0.8), wide) - 1.0) < 1e-4
    # Other factors agree too.
    np.testing.assert_allclose(plot.kde(x[:500], grid, 0.3),
                               scipy.stats.gaussian_kde(x[:500], bw_method=0.3)(grid), rtol=1e-9, atol=1e-12)


def test_density_png_from_sample_sets(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"stage 0": rng.normal(size=(2000, 2)),
            "stage 1": np.concatenate([rng.normal(-2, 0.3, (1000, 2)), rng.normal(2, 0.3, (1000, 2))])}
    for shared in (False, True):
        out = str(tmp_path / f"density_{shared}.png")
        plot.plot_density(sets, out, shared_axis=shared)
        assert os.path.getsize(out) > 1000 and open(out, "rb").read(8) == PNG_MAGIC


def saved_gorl_run(root, algo="gorl_fm", obs_size=5, act_size=1):
    """A run folder holding two gorl_fm stage checkpoints (no training: fresh parameters)."""
    run_dir = os.path.join(root, "CartpoleBalance__gorl_fm__1__x")
    args = gorl_fm.resolve(gorl_fm.Args(env_name="CartpoleBalance"))
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"algo": algo, **dataclasses.asdict(args)}, f)
    for stage in (0, 1):
        ckpt = {
            "params": {"encoder": gorl_fm.init_encoder(jax.random.PRNGKey(stage), obs_size, act_size, args),
                       "critic": common.mlp_init(jax.random.PRNGKey(9), [obs_size, 4, 1])},
            "norm": common.normalizer_init(obs_size),
            "decoder": gorl_fm.init_decoder(jax.random.PRNGKey(3), obs_size, act_size, args),
            "decoder_norm": common.normalizer_init(obs_size),
            "step": 100 * (stage + 1), "key": jax.random.PRNGKey(0), "stage_rows": [],
        }
        if stage == 1:  # a decoder that shifts every action by +1: a visibly different density
            ckpt["decoder"][-1]["b"] = jnp.ones(act_size)
        running.save_checkpoint(os.path.join(run_dir, "checkpoints", f"stage{stage}.npz"), ckpt)
    return run_dir


def test_density_from_a_saved_gorl_run(tmp_path, monkeypatch):
    run_dir = saved_gorl_run(str(tmp_path))
    # Sampling goes through gorl_fm.sample_actions with the run's flow_steps.
    config, sample = plot.load_policy(run_dir, 1)
    a = np.asarray(sample(jnp.zeros(5), jax.random.PRNGKey(0), 4000))
    assert a.shape == (4000, 1) and np.all(np.abs(a) < 1)
    np.testing.assert_allclose(np.arctanh(a).mean(), 1.0, atol=0.06)  # z ~ N(0, 1), then + 1
    # The state is normally taken from a rollout of the task; here, to keep the test free of MJX
    # compilation, a fixed observation.
    seen = {}

    def fake_pick_state(config, sample, rollout_steps, state_seed=0):
        seen["args"] = (config["env_name"], rollout_steps, state_seed)
        return np.zeros(5, np.float32)

    monkeypatch.setattr(plot, "pick_state", fake_pick_state)
    out = str(tmp_path / "density.png")
    plot.main(["density", run_dir, "--stages", "0", "1", "--num-samples", "3000", "--out", out,
               "--rollout-steps", "7", "--state-seed", "3"])
    assert seen["args"] == ("CartpoleBalance", 7, 3)
    assert os.path.getsize(out) > 1000 and open(out, "rb").read(8) == PNG_MAGIC


def saved_ppo_run(root):
    """A ppo.py run folder with its latest.npz (no training: small fresh networks, mean action 0.5)."""
    run_dir = os.path.join(root, "CartpoleBalance__ppo__1__x")
    args = ppo.resolve(ppo.Args(env_name="CartpoleBalance", actor_hidden=(8,), critic_hidden=(8,)))
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"algo": "ppo", **dataclasses.asdict(args)}, f)
    params = ppo.init_params(jax.random.PRNGKey(0), 5, 1, args)
    params["actor"][-1]["b"] = jnp.array([0.5, 0.0])  # mean 0.5, scale softplus(0) + 1e-3
    running.save_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"),
                           {"params": params, "norm": common.normalizer_init(5), "step": 0})
    return run_dir, params


def test_density_policy_of_a_ppo_run(tmp_path):
    run_dir, params = saved_ppo_run(tmp_path)
    _, sample = plot.load_policy(run_dir, None)
    obs = jnp.zeros(5)
    a = np.arctanh(np.asarray(sample(obs, jax.random.PRNGKey(1), 20000)))
    mean, scale = ppo.actor(params["actor"], obs)
    np.testing.assert_allclose(a.mean(), float(mean[0]), atol=0.02)
    np.testing.assert_allclose(a.std(), float(scale[0]), rtol=0.03)


# ---------------------------------------------------------------------------------------------
# plot.py video
# ---------------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GL = "could not create an offscreen OpenGL context"


def video_cli(*argv, **env):
    """`python plot.py video ...` in a fresh process: MuJoCo picks its OpenGL backend when it is first
    imported, and this process imported it (through common) before any test could choose one."""
    result = subprocess.run([sys.executable, "plot.py", "video", *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **env})
    if result.returncode and NO_GL in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    return result


def mp4_frames(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    width, height = next(reader)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


@pytest.mark.slow
def test_video_of_a_two_stage_gorl_run_and_of_a_baseline(tmp_path):
    # GoRL: one clip per saved stage, side by side.
    run_dir = saved_gorl_run(str(tmp_path))
    result = video_cli(run_dir, "--episode-length", "4", "--height", "64", "--width", "96")
    frames = mp4_frames(os.path.join(run_dir, "video.mp4"))
    assert frames.shape == (5, 64, 2 * 96, 3)  # the reset state and 4 steps; stage 0 | stage 1
    assert "stage 0: 4 steps" in result.stdout and "stage 1: 4 steps" in result.stdout
    assert frames[-1, :, :96].std() > 10 and frames[-1, :, 96:].std() > 10  # scenes, not blank tiles
    # A baseline's latest.npz, given as a checkpoint path, written as a GIF.
    ppo_dir, _ = saved_ppo_run(tmp_path)
    out = str(tmp_path / "ppo.gif")
    video_cli(os.path.join(ppo_dir, "checkpoints", "latest.npz"), "--episode-length", "3", "--height", "48",
              "--width", "64", "--fps", "25", "--camera", "lookatcart", "--out", out)
    with Image.open(out) as gif:
        assert gif.size == (64, 48) and gif.n_frames == 4


@pytest.mark.skipif(sys.platform != "linux", reason="glfw without a display fails for sure only on Linux")
def test_video_without_an_offscreen_backend_says_what_is_missing(tmp_path, monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        plot.select_gl_backend(("glfw",))  # a backend that needs a display
    message = str(exc.value)
    assert f"{NO_GL} with MUJOCO_GL=glfw (" in message and "libegl1" in message and "libosmesa6" in message
    # The user's MUJOCO_GL is the one tried, and the command stops with the message, no traceback.
    run_dir = saved_gorl_run(str(tmp_path))
    result = subprocess.run([sys.executable, "plot.py", "video", run_dir], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "MUJOCO_GL": "glfw"})
    assert result.returncode == 1 and NO_GL in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(run_dir, "video.mp4"))


def test_video_of_a_run_it_cannot_render_says_why(tmp_path):
    def error(*argv):
        with pytest.raises(SystemExit) as exc:
            plot.main(["video", *map(str, argv)])
        return str(exc.value)

    assert "not a run folder" in error(tmp_path / "nowhere")
    gorl_dir = saved_gorl_run(str(tmp_path))
    assert "no checkpoint stage5.npz" in error(gorl_dir, "--stages", "0", "5") and "holds stage0.npz, stage1.npz" in error(gorl_dir, "--stages", "5")
    assert "not of one checkpoint" in error(os.path.join(gorl_dir, "checkpoints", "stage1.npz"), "--stages", "1")
    assert "no checkpoint stage7.npz" in error(os.path.join(gorl_dir, "checkpoints", "stage7.npz"))
    for name in ("stage0.npz", "stage1.npz"):
        os.remove(os.path.join(gorl_dir, "checkpoints", name))
    assert "no checkpoint of a completed stage" in error(gorl_dir)
    ppo_dir, _ = saved_ppo_run(tmp_path)
    assert "a ppo run has one policy" in error(ppo_dir, "--stages", "0")
    os.remove(os.path.join(ppo_dir, "checkpoints", "latest.npz"))
    assert "no checkpoint latest.npz" in error(ppo_dir)
    other = fake_run(tmp_path, "brax_ppo", 1, False)
    assert "is a run of brax_ppo; video renders runs of ppo.py, fpo.py" in error(other)
    assert "must be positive" in error(gorl_dir, "--width", "0")


def test_video_encoding_mp4_and_the_gif_fallback(tmp_path, monkeypatch):
    frames = np.zeros((6, 48, 80, 3), np.uint8)
    frames[:, :, :40] = np.arange(6)[:, None, None, None] * 40  # the left half brightens frame by frame
    out = plot.write_video(iter(frames), (80, 48), str(tmp_path / "v" / "clip.mp4"), fps=100)
    decoded = mp4_frames(out)
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 3
    # Without imageio-ffmpeg: a GIF beside the requested name, at most 50 frames a second.
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    out = plot.write_video(iter(frames), (80, 48), str(tmp_path / "clip.mp4"), fps=100)
    assert out == str(tmp_path / "clip.gif")
    with Image.open(out) as gif:
        assert gif.size == (80, 48) and gif.n_frames == 3 and gif.info["duration"] == 20


def test_video_camera_by_name_or_index_and_the_renderer_checks():
    import mujoco

    model = mujoco.MjModel.from_xml_string(
        '<mujoco><worldbody><camera name="side"/><camera name="top"/><geom size="1"/></worldbody></mujoco>')
    with pytest.raises(SystemExit, match="offscreen framebuffer is 640 x 480"):
        plot.check_renderer(model, 480, 1280)
    try:  # this process imported mujoco before anyone chose MUJOCO_GL: it renders, or says why not
        plot.check_renderer(model, 48, 64)
    except SystemExit as e:
        assert "cannot render offscreen in this process" in str(e) and "MUJOCO_GL=egl" in str(e)
    assert plot.camera_name(model, None) == "side"  # the task's first camera
    assert plot.camera_name(model, "1") == "top" and plot.camera_name(model, "top") == "top"
    assert plot.camera_name(model, "free") is None
    with pytest.raises(SystemExit, match="cameras are side, top"):
        plot.camera_name(model, "nope")
    assert plot.camera_name(mujoco.MjModel.from_xml_string("<mujoco/>"), None) is None


@pytest.mark.parametrize("algo, plain_sac", [("ppo", False), ("fpo", False), ("dppo", False), ("gorl_fm", False),
                                              ("gorl_diffusion", False), ("gorl_sac", False), ("gorl_sac", True)])
def test_video_policy_of_every_algorithm_is_its_deterministic_policy(algo, plain_sac):
    """The action plot.py video runs, from a checkpoint's arrays: the mean action (the baselines'
    deterministic evaluation), or the encoder's mean latent through the decoder, at init the
    identity (GoRL)."""
    import importlib

    module = importlib.import_module(algo)
    args = module.Args(env_name="CartpoleBalance", **({"plain_sac": True} if plain_sac else {}))
    args = module.resolve(args) if hasattr(module, "resolve") else args  # gorl_sac has no task-dependent flags
    key = jax.random.PRNGKey(0)
    obs = jax.random.normal(key, (1, 5))
    norm = common.normalizer_init(5)
    if algo.startswith("gorl"):
        encoder = module.init_encoder(key, 5, 1, args)
        encoder[-1]["b"] = encoder[-1]["b"].at[0].set(0.5)  # mean latent 0.5 (bounded by SAC's actor)
        policy = {"params": {"encoder": encoder}, "norm": norm, "decoder": module.init_decoder(key, 5, 1, args),
                  "decoder_norm": norm}
        expected = module.encoder(encoder, common.normalize(norm, obs))[0]
    else:
        policy = {"params": module.init_params(key, 5, 1, args), "norm": norm}
        expected = ppo.actor(policy["params"]["actor"], common.normalize(norm, obs))[0] if algo == "ppo" else None
    a = plot.deterministic_act(algo, args, 1)(policy, obs)
    assert a.shape == (1, 1) and bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(plot.deterministic_act(algo, args, 1)(policy, obs), a)  # no key, no sampling
    if expected is not None:
        np.testing.assert_allclose(a, expected, atol=1e-6)
