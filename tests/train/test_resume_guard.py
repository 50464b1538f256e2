"""A re-used run id resumes only with the inputs its checkpoints were made for; checkpoints carry
the random streams, in a form torch.load(weights_only=True) accepts. No Ray needed."""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from medclf.config import load_config
from medclf.train.inputs import FINGERPRINT_FILE, ResumeError, check_resume, run_fingerprint
from medclf.train.loop import rng_state, set_rng_state

DF = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["NORMAL", "POSITIVE"], "split": ["train", "val"]})


def fingerprint(*overrides, df=DF, classes=("NORMAL", "POSITIVE")):
    return run_fingerprint(load_config(None, ["model.arch=small_cnn", *overrides]), list(classes), df)


def test_changed_inputs_are_refused_naming_what_changed(tmp_path):
    run = str(tmp_path / "run")
    check_resume(run, fingerprint())  # first start: recorded
    assert os.path.exists(os.path.join(run, FINGERPRINT_FILE))
    check_resume(run, fingerprint())  # same inputs: resumes
    with pytest.raises(ResumeError, match=r"started with other architecture \(architecture: was 'small_cnn', "
                                          r"now 'resnet18'\).*--restart"):
        check_resume(run, fingerprint("model.arch=resnet18"))
    with pytest.raises(ResumeError, match=r"other classes \(classes: was \[.NORMAL., .POSITIVE.\]"):
        check_resume(run, fingerprint(classes=("NORMAL", "OTHER")))
    with pytest.raises(ResumeError, match=r"other preprocessing"):
        check_resume(run, fingerprint("preprocess.image_size=64"))
    with pytest.raises(ResumeError, match=r"other data listing;"):
        check_resume(run, fingerprint(df=DF.assign(split=["train", "train"])))


def test_restart_drops_the_checkpoints_and_starts_over(tmp_path):
    run = tmp_path / "run"
    check_resume(str(run), fingerprint())
    (run / "ray_train" / "checkpoint_000001").mkdir(parents=True)
    check_resume(str(run), fingerprint("model.arch=resnet18"), restart=True)
    assert not (run / "ray_train").exists()
    check_resume(str(run), fingerprint("model.arch=resnet18"))  # the new inputs are now the run's


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    np.random.seed(2)
    torch.save({"rng": [rng_state(gen)]}, tmp_path / "state.pt")
    expected = (torch.rand(3), torch.rand(3, generator=gen), np.random.rand(3))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    other = torch.Generator().manual_seed(99)
    set_rng_state(state["rng"][0], other)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=other), expected[1])
    assert np.array_equal(np.random.rand(3), expected[2])
