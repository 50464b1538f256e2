"""Training loop behaviour on Ray Train: early stopping and the time box stop when they should, and
`train.select_by=last` keeps the schedule's last epoch."""

import pytest

from medclf.config import load_config
from medclf.monitor.opened import open_model
from medclf.train.driver import run_training
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def cfg_overrides(phantom_root, tmp_path):
    return TINY + [f"data.root={phantom_root}", f"run.root={tmp_path}", "train.epochs=4", "train.early_stopping_patience=2",
                   "model.transfer=feature_extractor", "train.lr=1e-30", "train.weight_decay=0", "train.augment=false"]


def test_early_stopping_stops_after_patience_epochs_without_gain(ray_cluster, phantom_root, tmp_path):
    # A frozen backbone (BatchNorm statistics included) and a step size below float precision: the
    # weights cannot move, so validation loss is the same every epoch and never improves on epoch 1.
    cfg = load_config(None, cfg_overrides(phantom_root, tmp_path) + ["train.epochs=8"])
    result = run_training(cfg, str(tmp_path / "run"))
    h = result.history
    assert list(h.epoch) == [1, 2, 3]  # epoch 1 best, then 2 epochs without gain
    assert h.val_loss.nunique() == 1
    assert result.card.metrics["validation"]["best_epoch"] == 1

    # select_by=last: the same flat validation loss neither stops the run nor picks epoch 1
    last = run_training(load_config(None, cfg_overrides(phantom_root, tmp_path) + ["train.select_by=last"]),
                        str(tmp_path / "run-last"))
    assert list(last.history.epoch) == [1, 2, 3, 4] and last.history.val_loss.nunique() == 1
    assert last.card.metrics["validation"]["best_epoch"] == 4


def test_time_box_ends_training_between_epochs(ray_cluster, phantom_root, tmp_path):
    cfg = load_config(None, TINY + [f"data.root={phantom_root}", f"run.root={tmp_path}", "train.epochs=6",
                                    "train.early_stopping_patience=99", "train.max_minutes=0.0001",
                                    "train.ema_decay=0.9", "train.label_smoothing=0.1",
                                    "train.threshold=target_sensitivity", "train.target_sensitivity=0.9",
                                    "train.threshold_validation=shifted", "ood.enabled=true", "data.modalities=[dx]"])
    result = run_training(cfg, str(tmp_path / "run"))
    assert list(result.history.epoch) == [1]  # the first epoch always runs; no second one fits
    assert result.card.threshold_rule == "target_sensitivity 0.9 on shifted patient validation, calibrated"
    # the out-of-scope guard's domain record (medclf.monitor.ood; tested in tests/monitor/test_ood.py)
    # is in the artifact
    domain = open_model(result.model_path).domain
    assert domain.record.modalities == ["DX"] and domain.record.min_size == 16 and domain.record.n_fit >= 4
