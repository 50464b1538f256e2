"""The CUDA paths, run where a GPU is present (skipped elsewhere): Ray Train on the GPU with AMP, and
scoring on the GPU agreeing with scoring on the CPU. CI has no GPU; benchmarks/gpu_train.sh and the
GPU section of docs/benchmarks.md record the runs on a GPU machine."""

import glob
import json
import os

import numpy as np
import pytest
import torch

from medclf.config import load_config
from medclf.data.predictions import prob_column, read_predictions
from medclf.score.batch import run_scoring
from medclf.train.driver import run_training
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_training_on_the_gpu_with_amp_then_gpu_scoring_matches_cpu(gpu_ray, phantom_root, tmp_path):
    base = TINY + [f"data.root={phantom_root}", f"run.root={tmp_path}", "train.num_workers=1",
                   "train.cpus_per_worker=1", "tracking.enabled=false", "train.epochs=2", "score.extensions=[.png]"]
    cfg = load_config(None, base + ["train.use_gpu=true"])
    result = run_training(cfg, str(tmp_path / "run"))
    workers = json.load(open(tmp_path / "run" / "workers.json"))
    assert [w["device"].split(":")[0] for w in workers] == ["cuda"]
    assert list(result.history.epoch) == [1, 2] and np.isfinite(result.history.train_loss).all()

    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))
    assert files
    scored = {}
    for device in ("gpu", "cpu"):
        out = str(tmp_path / f"pred-{device}")
        score_cfg = load_config(None, base + [f"score.use_gpu={'true' if device == 'gpu' else 'false'}"])
        summary = run_scoring(score_cfg, f"score-{device}", os.path.join(phantom_root, "test"),
                              result.model_path, out)
        assert summary.failed == 0 and summary.scored == len(files)
        pred = read_predictions(out).set_index("path").loc[files]
        scored[device] = pred[[prob_column(c) for c in result.card.classes]].to_numpy()
    # The GPU runs the model under fp16 autocast: probabilities agree to fp16 precision, not exactly.
    np.testing.assert_allclose(scored["gpu"], scored["cpu"], atol=5e-3)
