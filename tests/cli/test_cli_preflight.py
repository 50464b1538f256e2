"""One CLI (issue 36, item 3): --version, one-line command descriptions, --extensions, and user errors
found before Ray starts, each naming the fix. No Ray: `init_ray` is replaced by a stop sign."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import medclf.cli
from medclf.cli import COMMANDS, main, run_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RayWouldStart(Exception):
    pass


class _Seen(list):
    """The configs the commands reached Ray with; `options`: the keywords each passed to init_ray."""

    def __init__(self):
        super().__init__()
        self.options = []


@pytest.fixture
def no_ray(monkeypatch):
    """Reaching Ray means every check passed: stop there, keeping the config the command built."""
    seen = _Seen()

    def stop(cfg, **options):
        seen.append(cfg)
        seen.options.append(options)  # how the command asked for Ray (state_api: medclf.ops.runs.local_ray_options)
        raise RayWouldStart

    for commands in (medclf.cli.training, medclf.cli.scoring):  # the commands that start Ray
        monkeypatch.setattr(commands, "init_ray", stop)
    return seen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import build_model

    path = str(tmp_path_factory.mktemp("artifact") / "model")
    save_artifact(build_model("small_cnn", 2), ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"],
                                                         positive_class="POSITIVE", preprocess={"image_size": 32}), path)
    return path


def _images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(os.path.join(folder, name),
                                                                format="PNG" if name.endswith(".png") else "JPEG")
    return str(folder)


def test_version(capsys):
    from medclf import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"medclf {__version__}"
    out = subprocess.run([sys.executable, "-m", "medclf.cli", "--version"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.startswith("medclf ")


def test_help_gives_every_command_a_one_line_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listing = capsys.readouterr().out.split("commands:\n")[1].splitlines()
    assert [line.split()[0] for line in listing] == list(COMMANDS)
    for line in listing:
        words = line.split(None, 1)
        assert len(words) == 2 and len(words[1]) > 15 and len(line) <= 120, line


def test_missing_model_folder_fails_before_ray_naming_the_fix(tmp_path, capsys, no_ray):
    inputs = _images(tmp_path / "in", ["a.png"])
    rc = run_command("score", ["--run-root", str(tmp_path / "runs"), "--input", inputs,
                               "--model", str(tmp_path / "no_model")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'no_model'}: model folder not found" in err and "--model" in err
    assert not no_ray and not (tmp_path / "runs").exists()  # no Ray, no empty run folder


def test_no_matching_inputs_fail_before_ray_naming_the_suffixes_and_the_flag(tmp_path, capsys, no_ray, model_dir):
    inputs = _images(tmp_path / "films", ["a.jpeg", "b.jpeg", "c.jpeg"])
    rc = run_command("score", ["--run-root", str(tmp_path / "runs"), "--input", inputs, "--model", model_dir,
                               "--set", "score.extensions=[.png]"])
    err = capsys.readouterr().err
    assert rc == 2 and "no input files with extensions ['.png']" in err and "found 3 .jpeg" in err
    assert "--extensions .jpeg .png" in err
    assert not no_ray and not (tmp_path / "runs").exists()


def test_extensions_flag_reaches_the_config(tmp_path, no_ray, model_dir):
    inputs = _images(tmp_path / "films", ["a.jpeg", "b.jpg"])
    with pytest.raises(RayWouldStart):
        run_command("score", ["--run-root", str(tmp_path / "runs"), "--input", inputs, "--model", model_dir,
                              "--set", "score.extensions=[.png]", "--extensions", ".jpeg", ".jpg"])
    assert no_ray[0].score.extensions == [".jpeg", ".jpg"]
    assert no_ray.options[0] == {"state_api": False}  # scoring never trains: a local Ray without the dashboard
    from medclf.cli import explain_parser

    assert explain_parser().parse_args(["--extensions", ".png", "dicom"]).extensions == [".png", "dicom"]


def test_demo_config_scores_jpeg():
    from medclf.config import load_config

    exts = load_config(os.path.join(ROOT, "configs", "demo.yaml")).score.extensions
    assert {".jpg", ".jpeg", ".png", ".dcm"} <= set(exts)


def test_uid_hashing_needs_no_key_without_dicom(tmp_path, no_ray, model_dir, monkeypatch):
    monkeypatch.delenv("MEDCLF_UID_KEY", raising=False)
    inputs = _images(tmp_path / "films", ["a.jpeg", "b.png"])
    with pytest.raises(RayWouldStart):  # every check passed, no key asked for
        run_command("score", ["--run-root", str(tmp_path / "runs"), "--input", inputs, "--model", model_dir,
                              "--set", "score.uids=hash"])


def test_uid_hashing_with_dicom_says_how_to_choose(tmp_path, capsys, no_ray, model_dir, monkeypatch):
    monkeypatch.delenv("MEDCLF_UID_KEY", raising=False)
    inputs = _images(tmp_path / "mixed", ["a.jpeg"])
    open(os.path.join(inputs, "b.dcm"), "wb").write(b"\0" * 200)  # preflight judges by name; content is decode's job
    rc = run_command("score", ["--run-root", str(tmp_path / "runs"), "--input", inputs, "--model", model_dir,
                               "--set", "score.uids=hash"])
    err = capsys.readouterr().err
    assert rc == 2 and "b.dcm" in err and "MEDCLF_UID_KEY" in err
    assert "score.uids=drop" in err and "score.uids=keep" in err and not no_ray
    monkeypatch.setenv("MEDCLF_UID_KEY", "site-key")  # with the key: passes
    with pytest.raises(RayWouldStart):
        run_command("score", ["--run-root", str(tmp_path / "runs"), "--input", inputs, "--model", model_dir,
                              "--set", "score.uids=hash"])


def test_explain_and_serve_check_the_model_before_ray(tmp_path, capsys, no_ray):
    for name, argv in (("explain", ["--input", str(tmp_path)]), ("serve", [])):
        rc = run_command(name, ["--run-root", str(tmp_path / "runs"), "--model", str(tmp_path / "gone"), *argv])
        assert rc == 2 and "model folder not found" in capsys.readouterr().err
    assert not no_ray


def test_make_targets_for_the_inner_loop_and_the_path():
    make = subprocess.run(["make", "-n", "test-fast", "shell", "demo", "VENV=/nonexistent-venv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if make.returncode != 0 and "make: not found" in make.stderr + make.stdout:
        pytest.skip("no make on this machine")
    out = make.stdout
    assert '-m "not ray"' in out  # test-fast: no Ray
    assert "bin/activate" in out  # shell / demo say how to get `medclf` on PATH
