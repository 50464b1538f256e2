"""Pneumonia benchmark: ImageNet transfer learning on the Kermany chest X-ray train split, time-boxed.

    python benchmarks/train_pneumonia.py [--data ../shared/data/chest_xray/train] [--set KEY=VALUE ...]

On a 2-core CPU machine, within 45 minutes wall clock:
  1. throughput: a plain single-process PyTorch loop (2 threads) over a sample of the training
     images, same model, batch, augmentation and optimiser as the Ray Train job (TrainingParts);
  2. the training job itself (Ray Train, 2 workers, config configs/pneumonia_xray.yaml), whose
     per-epoch images/s is compared with (1); validation is family-held-out (data.val_scheme=family):
     the epoch, the temperature and the threshold are chosen on held-out acquisition families and the
     latest patients, and the usual patient-level part is reported beside it;
  3. validation metrics of the saved model at its own threshold (calibrated scores), on both parts of
     validation as they are and the family part under acquisition shifts (gamma, contrast + blur,
     zoom), plus test-time augmentation (mean over zooms);
and prints the model artifact path for `jobs/score.py --model`. Results: <run folder>/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf.ops import runs  # noqa: E402
from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift  # noqa: E402
from medclf.config import load_config  # noqa: E402
from medclf.report.metrics import binary_metrics  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities
from medclf.imaging.preprocess import to_model_input  # noqa: E402
from medclf.train.driver import run_training  # noqa: E402
from medclf.train.inputs import prepare_data, preprocess_all, validation_groups  # noqa: E402
from medclf.train.parts import TrainingParts, worker_config  # noqa: E402


def plain_loop_images_per_s(cfg, df, classes, n_images: int, threads: int) -> float:
    """Images/s of one process training on a sample of the train split (first batch is warm-up)."""
    batch = cfg.train.batch_size * cfg.train.num_workers  # the Ray job's global batch
    n_images = max(n_images, 3 * batch)  # a warm-up batch and at least two timed ones
    train = df[df.split == cfg.data.train_split].sample(n=n_images, random_state=0)
    pixels, errors = preprocess_all(list(train.path), cfg)
    assert not errors, errors[:3]
    y = torch.tensor([classes.index(c) for c in train.label])
    torch.set_num_threads(threads)
    parts = TrainingParts.build(worker_config(cfg, classes, y.numpy()), torch.device("cpu"))
    parts.model.train()
    gen = torch.Generator().manual_seed(0)
    x_all = torch.from_numpy(pixels)
    seen, start = 0, None
    for i in range(0, n_images - batch + 1, batch):
        parts.step(x_all[i:i + batch], y[i:i + batch], gen)
        if start is None:
            start = time.time()  # after the warm-up batch
        else:
            seen += batch
    return seen / (time.time() - start)


def predict(model, x: torch.Tensor, positive: int, temperature: float, batch: int = 128) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = to_model_input(x[i:i + batch]).contiguous(memory_format=torch.channels_last)
            out.append(class_probabilities(model(xb), temperature)[:, positive].numpy())
    return np.concatenate(out)


def robustness_table(cfg, model_path: str, run_dir: str) -> pd.DataFrame:
    """Metrics at the model's threshold on calibrated scores: each validation part as is, the selection
    part under acquisition shifts, and with zoom TTA."""
    model, card = load_artifact(model_path)
    model = model.to(memory_format=torch.channels_last)
    splits = pd.read_parquet(os.path.join(run_dir, "splits.parquet"))
    val = splits[splits.split == cfg.data.val_split].reset_index(drop=True)
    groups = validation_groups(val)
    select = "family" if (groups == "family").any() else "patient"
    pixels, _ = preprocess_all(list(val.path), cfg)
    y_all = (val.label == card.positive_class).astype(int).to_numpy()
    pos, pc, t = card.positive_index, card.preprocess_spec, card.temperature
    rows, probs = [], {}
    for group in dict.fromkeys([select, "patient"]):
        rows_in = groups == group
        if rows_in.any():
            p = predict(model, torch.from_numpy(pixels[rows_in]), pos, t)
            rows.append({"validation": f"{group} part, as is", **binary_metrics(y_all[rows_in], p, card.threshold)})
    x, y = torch.from_numpy(pixels[groups == select]), y_all[groups == select]
    for kind in ("as is", *ACQUISITION_SHIFTS):
        probs[kind] = predict(model, acquisition_shift(x, kind, pc.mean, pc.std), pos, t)
        if kind != "as is":
            rows.append({"validation": f"{select} part, {kind}", **binary_metrics(y, probs[kind], card.threshold)})
    tta = np.mean([probs["as is"], probs["zoom 0.9"], probs["zoom 1.1"]], axis=0)
    rows.append({"validation": f"{select} part, TTA: mean of as is, zoom 0.9, zoom 1.1",
                 **binary_metrics(y, tta, card.threshold)})
    return pd.DataFrame(rows)


def epochs_note(cfg, hist: pd.DataFrame) -> str:
    """How many epochs ran, and why training ended there."""
    done, planned = len(hist), cfg.train.epochs
    if done >= planned:
        return f"completed all {planned} configured epochs"
    lowest = int(hist.val_loss.idxmin()) + 1
    if done - lowest >= cfg.train.early_stopping_patience:
        return (f"completed {done} of {planned} epochs: early stop, no val_loss gain for "
                f"{done - lowest} epochs")
    mean_epoch = float(hist.epoch_seconds.mean())
    return (f"completed {done} of {planned} epochs: time box train.max_minutes={cfg.train.max_minutes} "
            f"(epochs took {mean_epoch:.0f} s on average; the machine was slower than the budget assumes, "
            "e.g. loaded by other work)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "pneumonia_xray.yaml"))
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "chest_xray", "train"))
    p.add_argument("--run-root", default=os.path.join(ROOT, "runs"))
    p.add_argument("--run-id", help="fixed run id (re-using one resumes the training)")
    p.add_argument("--plain-images", type=int, default=448, help="images in the plain-loop throughput sample")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    t0 = time.time()
    overrides = [f"data.root={args.data}", f"run.root={args.run_root}"] + args.overrides
    if args.run_id:
        overrides.append(f"run.id={args.run_id}")
    cfg = load_config(args.config, overrides)
    df, classes = prepare_data(cfg)
    runs.init_ray(cfg)
    run_dir = runs.run_folder(cfg, runs.new_run_id(cfg))
    runs.save_resolved_config(cfg, run_dir, "train")
    print(f"[bench] run folder {run_dir}", flush=True)

    plain = plain_loop_images_per_s(cfg, df, classes, args.plain_images, args.threads)
    print(f"[bench] plain loop, 1 process x {args.threads} threads: {plain:.1f} images/s", flush=True)

    result = run_training(cfg, run_dir, (df, classes))
    hist = result.history
    ray_ips = float(hist.images_per_s.median())
    train_wall = float(hist.epoch_seconds.sum())
    print(f"[bench] Ray Train, {cfg.train.num_workers} workers: {ray_ips:.1f} images/s (median over "
          f"{len(hist)} epochs); ratio to plain loop {ray_ips / plain:.3f}", flush=True)

    stopped = epochs_note(cfg, hist)
    print(f"[bench] {stopped}", flush=True)
    table = robustness_table(cfg, result.model_path, run_dir)
    cols = ["validation", "threshold", "accuracy", "sensitivity", "specificity", "roc_auc", "f1"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    wall = time.time() - t0
    report = {
        "run_dir": run_dir,
        "model_path": result.model_path,
        "model_id": result.card.model_id,
        "threshold": result.card.threshold,
        "wall_seconds": wall,
        "train_epoch_seconds_sum": train_wall,
        "epochs_run": int(len(hist)),
        "epochs_configured": cfg.train.epochs,
        "stopped": stopped,
        "calibration": result.card.calibration,
        "validation_parts": {k: v for k, v in result.card.metrics.items() if k.startswith("validation_")},
        "best_epoch": result.card.metrics["validation"]["best_epoch"],
        "plain_loop_images_per_s": plain,
        "ray_train_images_per_s": ray_ips,
        "throughput_ratio": ray_ips / plain,
        "validation": table.to_dict(orient="records"),
        "device": "cuda" if torch.cuda.is_available() and cfg.train.use_gpu else f"cpu x{os.cpu_count()}",
    }
    with open(os.path.join(run_dir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"[bench] done in {wall / 60:.1f} min; model artifact: {result.model_path}")
    print(f"[bench] score other data with: python jobs/score.py --config {args.config} "
          f"--model {result.model_path} --input <folder>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
