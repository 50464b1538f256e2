"""A stand-in for the shipped pneumonia default, trained in one process (plain torch, GPU if any).

    python benchmarks/standin_pneumonia_gpu.py --splits RUN/splits.parquet --images-from PACK --weights LITE0.pth --out MODEL

For when the Ray Train run of configs/pneumonia_xray.yaml is not available (this session: it died
of out-of-memory on the shared 2-core machine) and the machine with a GPU has no Ray. It follows the
recipe, not main's code path: EfficientNet-Lite0 from its ImageNet weights, freeze_first:9 (frozen
BatchNorm kept in eval), 224 px, dropout 0.2, AdamW lr 1e-3 wd 0.01, one warm-up epoch then
cosine, 6 epochs, batch 64, balanced class weights, the config's augmentation (medclf.data.augment),
epoch chosen by family-validation ROC AUC, temperature fitted on family validation, threshold
target_sensitivity 0.95 on calibrated family validation. Same split (the run's splits.parquet).
Results on it are a stand-in's, and say so.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

AUGMENT = dict(rotate_deg=10, translate=0.06, scale=[0.85, 1.15], brightness=0.1, contrast=0.2, gamma=[0.7, 1.4],
               blur_prob=0.2, noise_std=0.05, hflip=False)


def main(argv=None) -> int:
    from sklearn.metrics import roc_auc_score

    from medclf.data.augment import augment_batch
    from medclf.imaging.decode import decode
    from medclf.imaging.preprocess import preprocess_gray, to_model_input
    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import apply_transfer_mode, build_model, set_train_mode
    from medclf.model.calibration import fit_temperature, softmax_with_temperature
    from medclf.report.metrics import binary_metrics
    from medclf.model.decision import choose_threshold
    from medclf.config import PreprocessConfig

    p = argparse.ArgumentParser()
    p.add_argument("--splits", required=True, help="splits.parquet with path (file name used), label, split, val_group")
    p.add_argument("--images-from", required=True, help="folder holding the files by their base name")
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    classes = ["NORMAL", "PNEUMONIA"]
    spec = PreprocessConfig(image_size=224, mean=0.5, std=0.5)
    df = pd.read_parquet(args.splits)
    df = df[(df.split == "train") | (df.val_group == "family")].reset_index(drop=True)

    def load(path):
        local = os.path.join(args.images_from, os.path.basename(path))
        return preprocess_gray(decode(open(local, "rb").read(), local).image, spec)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        x = torch.from_numpy(np.stack(list(pool.map(load, df.path))))
    y = torch.tensor([classes.index(lab) for lab in df.label])
    train, val = np.flatnonzero(df.split == "train"), np.flatnonzero(df.split != "train")
    print(f"[standin] {len(train)} train, {len(val)} family validation films decoded in {time.time() - t0:.0f}s",
          flush=True)
    model = build_model("efficientnet_lite0", 2, args.weights, dropout=0.2)
    frozen = apply_transfer_mode(model, "efficientnet_lite0", "freeze_first:9")
    model = model.to(dev)
    counts = np.bincount(y[train].numpy(), minlength=2).astype(float)
    weights = torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32, device=dev)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.01)

    def factor(epoch):
        return (epoch + 1) / 2 if epoch < 1 else 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, args.epochs - 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(0)
    xt, yt, xv = x[train], y[train], x[val]
    best = None
    for epoch in range(args.epochs):
        set_train_mode(model, frozen)
        for idx in torch.randperm(len(train), generator=gen).split(64):
            xb = augment_batch(xt[idx].clone(), AUGMENT, spec.mean, spec.std, gen).to(dev)
            loss = torch.nn.functional.cross_entropy(model(to_model_input(xb)), yt[idx].to(dev), weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.inference_mode():
            logits = torch.cat([model(to_model_input(xv[i:i + 256].to(dev))).float().cpu()
                                for i in range(0, len(val), 256)]).numpy()
        auc = roc_auc_score(y[val].numpy(), logits[:, 1] - logits[:, 0])
        print(f"[standin] epoch {epoch + 1}: family validation AUC {auc:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if best is None or auc > best[0]:
            best = (auc, epoch + 1, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, logits)
    auc, epoch, state, logits = best
    model.load_state_dict(state)
    yv = y[val].numpy()
    temperature = fit_temperature(logits, yv)
    probs = softmax_with_temperature(logits, temperature)
    threshold = choose_threshold(yv, probs[:, 1], "target_sensitivity", 0.95)
    metrics = binary_metrics(yv, probs[:, 1], threshold)
    card = ModelCard(arch="efficientnet_lite0", classes=classes, preprocess=spec.model_dump(), positive_class="PNEUMONIA",
                     threshold=threshold, temperature=temperature,
                     threshold_rule="target_sensitivity 0.95 on clean family validation, calibrated",
                     metrics={"validation": {**metrics, "best_epoch": epoch}, "selected_on": "family validation"},
                     config={"train": {"threshold": "target_sensitivity", "target_sensitivity": 0.95},
                             "model": {"dropout": 0.2}, "standin": "benchmarks/standin_pneumonia_gpu.py"})
    save_artifact(model.cpu().eval(), card, args.out)
    print(f"[standin] best epoch {epoch}, family AUC {auc:.4f}, T {temperature:.3f}, threshold {threshold:.4f} -> "
          f"{args.out} ({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
