"""Drift detection power vs shift size and batch size, false-alarm rate, and the drift job's time per 100k rows.

Statistics-level simulation on phantoms: a small_cnn is trained in-process (2 epochs, 800 phantoms,
32 px) and given a domain record and drift reference measured on 400 labelled phantom files
(medclf.monitor.ood.add_domain, medclf.monitor.reference.add_reference). Each condition is a pool of phantoms
rendered in memory with the shift applied (gamma u -> u**g; or a positive-class prevalence), from
which the rows scoring would write are computed with the same functions scoring uses
(stats.image_stats on the decoded-equivalent image, the model's features, calibrated scores,
ood_score, embedding projection), without the file round trip. Batches of 200 / 1,000 / 5,000 rows
are drawn from each pool (with replacement), `repeats` times, and `medclf.monitor.drift.compare` decides.

    PYTHONPATH=. python benchmarks/drift_power.py --repeats 20 --out /tmp/drift_power
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import pandas as pd
import torch

from medclf.config import DriftConfig, load_config
from medclf.monitor.drift import compare, run_drift
from medclf.model.artifact import load_card, save_artifact
from medclf.model.networks import build_model, class_probabilities
from medclf.data.predictions import EMB_COLUMNS, prob_column
from medclf.monitor.ood import add_domain, features_and_logits
from medclf.monitor.opened import open_model
from medclf.data.phantoms import generate, render
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.monitor.reference import add_reference
from medclf.imaging.stats import image_stats

SIZE = 32
BASE = ["data.classes=[NORMAL, POSITIVE]", "data.positive_class=POSITIVE", f"preprocess.image_size={SIZE}",
        "model.arch=small_cnn", "ood.enabled=true", "ood.quantile=0.95", "data.modalities=[CR, DX]"]


def build(out: str) -> str:
    """A phantom model with a domain record and a drift reference; returns its artifact path."""
    from medclf.model.artifact import ModelCard

    cfg = load_config(None, BASE)
    spec = cfg.preprocess
    y = torch.arange(800) % 2
    x = torch.from_numpy(np.stack([preprocess_gray(render(np.random.default_rng([20, 0, i]), np.random.default_rng(
        [20, 1, i]), SIZE, bool(y[i])).image, spec) for i in range(800)]))
    torch.manual_seed(0)
    model = build_model("small_cnn", 2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        model.train()
        for b in torch.randperm(800).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(to_model_input(x[b])), y[b]).backward()
            opt.step()
    with torch.no_grad():
        p = torch.softmax(model.eval()(to_model_input(x)), 1)[:, 1]
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess=spec.model_dump(),
                     positive_class="POSITIVE", threshold=float(p.median()), threshold_rule="median training score",
                     config=cfg.model_dump(mode="json"))
    save_artifact(model.eval(), dataclasses.replace(card), os.path.join(out, "plain"))
    manifest = generate(os.path.join(out, "reference"), n_train=400, n_test=0, image_size=SIZE, formats=("png",),
                        seed=21)
    paths = [os.path.join(out, "reference", p) for p in manifest.path]
    add_domain(os.path.join(out, "plain"), os.path.join(out, "guarded"), cfg, paths, list(manifest.label))
    add_reference(os.path.join(out, "guarded"), os.path.join(out, "model"), paths, list(manifest.label))
    return os.path.join(out, "model")


def pool_rows(model_path: str, n: int, seed: int, gamma: float = 1.0, prevalence: float = 0.5) -> pd.DataFrame:
    """The rows scoring would write for `n` phantoms (shift applied to the decoded image)."""
    opened = open_model(model_path)
    model, card, domain, reference = opened.model, opened.card, opened.domain, opened.reference
    rng = np.random.default_rng([seed, 9])
    images, stats = [], []
    for i in range(n):
        positive = bool(rng.random() < prevalence)
        image = render(np.random.default_rng([seed, 0, i]), np.random.default_rng([seed, 1, i]), SIZE, positive).image
        image = np.round(np.clip(image, 0, 1) ** gamma * 255) / 255  # as a shifted 8-bit PNG would decode
        stats.append(image_stats(image.astype(np.float32)))
        images.append(preprocess_gray(image.astype(np.float32), card.preprocess_spec))
    features, logits = features_and_logits(model, card.arch, np.stack(images))
    probs = class_probabilities(torch.from_numpy(logits), card.temperature).numpy()
    rows = pd.DataFrame(stats)
    rows["status"], rows["format"], rows["modality"] = "ok", "png", None
    for k, c in enumerate(card.classes):
        rows[prob_column(c)] = probs[:, k]
    rows["predicted_label"] = np.where(probs[:, 1] >= card.threshold, "POSITIVE", "NORMAL")
    rows["ood_score"] = domain.scores(features, logits)
    rows[EMB_COLUMNS] = reference.project(features)
    return rows


def power(model_path: str, repeats: int, dc: DriftConfig) -> pd.DataFrame:
    opened = open_model(model_path, network=False)
    card, reference, domain = opened.card, opened.reference, opened.domain
    conditions = [("none", 1.0, 0.5)] + [("gamma", g, 0.5) for g in (0.9, 0.8, 0.7, 0.6)] + \
                 [("prevalence", 1.0, p) for p in (0.3, 0.4, 0.6, 0.7)]
    out = []
    for c, (kind, gamma, prevalence) in enumerate(conditions):
        pool = pool_rows(model_path, 5000, 100 + c, gamma, prevalence)
        for size in (200, 1000, 5000):
            for r in range(repeats):
                batch = pool.sample(size, replace=True, random_state=r)
                table = compare(batch, reference, domain, card, dc).set_index("statistic")
                out.append({"shift": kind, "gamma": gamma, "prevalence": prevalence, "batch": size, "repeat": r,
                            "any_flag": bool(table["flag"].any()),
                            "intensity_flag": bool(table.loc[["img_mean", "img_sd", "img_p5", "img_p50",
                                                              "img_p95"], "flag"].any()),
                            "positive_rate_flag": bool(table.loc["positive_rate", "flag"]),
                            "embedding_flag": bool(table.loc["embedding", "flag"]),
                            "flags": ",".join(table.index[table["flag"]])})
        print(f"{kind} gamma {gamma} prevalence {prevalence}: done", flush=True)
    return pd.DataFrame(out)


def embedding_tests(model_path: str, repeats: int) -> pd.DataFrame:
    """Power of MMD vs the classifier two-sample test on the embedding alone, batches of 200."""
    from medclf.monitor.drift import classifier_test, mmd_test

    ref = open_model(model_path, network=False).reference.arrays["emb"]
    out = []
    for gamma in (1.0, 0.9, 0.8, 0.7):
        pool = pool_rows(model_path, 2000, 300 + int(gamma * 10), gamma)[EMB_COLUMNS].to_numpy()
        for r in range(repeats):
            batch = pool[np.random.default_rng(r).choice(len(pool), 200)]
            out.append({"gamma": gamma, "repeat": r, "mmd_p": mmd_test(ref, batch, 1000, r)[1],
                        "classifier_p": classifier_test(ref, batch, r)[1]})
    return pd.DataFrame(out)


def time_per_100k(model_path: str, out: str, dc: DriftConfig) -> float:
    """Seconds of run_drift (read, compare, plots, HTML) over a 100,000-row predictions dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medclf.data.predictions import prediction_schema

    card = load_card(model_path)
    rows = pool_rows(model_path, 5000, 7).sample(100_000, replace=True, random_state=0).reset_index(drop=True)
    rows["path"] = [f"/archive/img{i}.png" for i in range(len(rows))]
    rows["model_id"], rows["run_id"] = card.model_id, "bench"
    schema = prediction_schema(card.classes)
    table = pa.table({f.name: pa.array(rows[f.name] if f.name in rows else [None] * len(rows), f.type)
                      for f in schema}, schema=schema)
    folder = os.path.join(out, "predictions", "run_date=2026-11-24")
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, "part-0.parquet"))
    start = time.perf_counter()
    run_drift(dc, model_path, os.path.join(out, "predictions"), os.path.join(out, "report"), run_id="bench")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="/tmp/drift_power")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dc = DriftConfig()
    model = build(args.out)
    seconds = time_per_100k(model, args.out, dc)
    print(f"drift job over 100,000 rows: {seconds:.1f} s", flush=True)
    emb = embedding_tests(model, args.repeats)
    emb.to_parquet(os.path.join(args.out, "embedding_tests.parquet"))
    print("embedding shift, batches of 200: share of p < 0.003 (the Holm threshold of the smallest of 15 p-values)")
    print(emb.groupby("gamma")[["mmd_p", "classifier_p"]].agg(lambda p: (p < 0.05 / 15).mean()).to_string())
    result = power(model, args.repeats, dc)
    result.to_parquet(os.path.join(args.out, "drift_power.parquet"))
    summary = result.groupby(["shift", "gamma", "prevalence", "batch"])[
        ["any_flag", "intensity_flag", "positive_rate_flag", "embedding_flag"]].mean().unstack("batch")
    print(summary.round(2).to_string())


if __name__ == "__main__":
    main()
