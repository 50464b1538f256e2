import os
import subprocess
import sys

import pytest

from medclf.cli import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("job", ["train", "score", "evaluate", "explain", "demo"])
def test_job_help_explains_every_option(job):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", f"{job}.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd="/")  # works from any directory
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"usage: jobs/{job}.py")
    options = [line.split()[0] for line in text.split("options:")[1].splitlines() if line.strip().startswith("-")]
    assert "--config" in text and "--set" in text and len(options) >= 5
    for line in text.split("options:")[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("-") and "  " not in stripped:
            # an option whose help moved to the next line: that next line must be the help text
            nxt = text.split(line, 1)[1].splitlines()[1]
            assert nxt.startswith(" " * 10) and nxt.strip(), f"{stripped} has no help"


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run:\n  root: {tmp_path / 'runs'}\nmodel:\n  arch: resnet19\ntrain:\n  epcohs: 3\n")
    rc = run_command("train", ["--config", str(bad), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and "model.arch: unknown model 'resnet19'" in err and "train.epcohs: unknown key" in err
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_missing_data_is_reported_with_its_path(tmp_path, capsys, monkeypatch):
    import medclf.cli.training

    started = []
    monkeypatch.setattr(medclf.cli.training, "init_ray", lambda cfg: started.append(cfg))  # another test's Ray may be up
    rc = run_command("train", ["--set", f"run.root={tmp_path / 'runs'}", "--data", str(tmp_path / "nowhere")])
    assert rc == 2 and f"{tmp_path / 'nowhere'}: data folder not found" in capsys.readouterr().err
    assert not started  # failed before starting Ray


def test_phantoms_command(tmp_path, capsys):
    rc = run_command("phantoms", ["--out", str(tmp_path), "--n-train", "4", "--n-test", "2", "--image-size", "32"])
    assert rc == 0 and (tmp_path / "manifest.parquet").exists() and "wrote 12 files" in capsys.readouterr().out


def test_path_options_are_strings_not_yaml(tmp_path):
    from medclf.cli.parsers import config_from, score_parser

    args = score_parser().parse_args(["--input", "/archive/night #2/", "--output", "~", "--model", "null",
                                      "--run-root", "[runs]", "--set", "score.batch_size=8"])
    cfg = config_from(args, options={"score.input": "input", "score.output": "output", "score.model": "model"})
    assert (cfg.score.input, cfg.score.output, cfg.score.model) == ("/archive/night #2/", "~", "null")
    assert cfg.run.root == "[runs]" and cfg.score.batch_size == 8  # --set values are still YAML


@pytest.mark.parametrize("run_id", ["..", ".", "a/b", "../x"])
def test_run_id_must_be_one_safe_path_segment(run_id, tmp_path, capsys):
    rc = run_command("evaluate", ["--run-id", run_id, "--run-root", str(tmp_path), "--predictions", str(tmp_path)])
    assert rc == 2 and "run.id" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_user_errors_share_one_base_class_and_exit_2(tmp_path, capsys):
    from medclf.config import ConfigError
    from medclf.imaging.manifest import DatasetError
    from medclf.imaging.decode import DecodeError, NotAnImage
    from medclf.errors import UserError
    from medclf.report.evaluate import EvaluationError
    from medclf.model.artifact import ModelError

    for cls in (ConfigError, DatasetError, DecodeError, NotAnImage, EvaluationError, ModelError):
        assert issubclass(cls, UserError), cls
    rc = run_command("evaluate", ["--run-root", str(tmp_path), "--predictions", str(tmp_path / "none"),
                                  "--set", "data.classes=[NORMAL, POSITIVE]"])
    assert rc == 2 and "predictions folder not found" in capsys.readouterr().err


def test_verbose_raises_only_our_loggers(tmp_path):
    import logging

    before = {name: logging.getLogger(name).level for name in ("medclf", "botocore", "s3fs")}
    try:
        run_command("evaluate", ["-v", "--run-root", str(tmp_path), "--predictions", str(tmp_path / "none"),
                                 "--set", "data.classes=[NORMAL, POSITIVE]"])
        assert logging.getLogger("medclf.score.batch").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("botocore.endpoint").getEffectiveLevel() > logging.DEBUG
        assert logging.getLogger("s3fs").getEffectiveLevel() > logging.DEBUG
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
