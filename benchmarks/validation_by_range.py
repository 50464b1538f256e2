"""Which validation rows are hard? A trained run's validation metrics by acquisition family and by
range of patient numbers, at the model's own threshold (calibrated scores), with 95% bootstrap CIs.

    python benchmarks/validation_by_range.py RUN_DIR [--family-regex '^(NORMAL2-IM|IM|person)'] [--bins 3]

Used to choose data.val_scheme: a held-out part that a model finds as easy as its training archive
says nothing about a new one. Each family's normal (or positive) rows are scored against all rows of
the other class, so a range's AUC and specificity/sensitivity are comparable across ranges.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf.data.labelled import family_of  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.report.metrics import binary_metrics, bootstrap_ci  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities
from medclf.imaging.preprocess import preprocess_gray, to_model_input  # noqa: E402


def scores(model, card, paths: list[str], batch: int = 64) -> np.ndarray:
    spec, out = card.preprocess_spec, []
    for i in range(0, len(paths), batch):
        x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in paths[i:i + batch]])
        with torch.inference_mode():
            logits = model(to_model_input(torch.from_numpy(x)).contiguous(memory_format=torch.channels_last))
        out.append(class_probabilities(logits, card.temperature)[:, card.positive_index].numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--family-regex", default=r"^(NORMAL2-IM|IM|person)")
    p.add_argument("--bins", type=int, default=3, help="id ranges per family (equal patient counts)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, card = load_artifact(os.path.join(args.run_dir, "model"))
    model = model.to(memory_format=torch.channels_last)
    splits = pd.read_parquet(os.path.join(args.run_dir, "splits.parquet"))
    val = splits[splits["split"] == "val"].reset_index(drop=True)
    val["score"] = scores(model, card, list(val["path"]))
    val["y"] = (val["label"] == card.positive_class).astype(int)
    val["family"] = val["path"].map(lambda q: family_of(q, args.family_regex))
    val["number"] = val["patient_id"].str.extract(r"(\d+)$")[0].astype(int)
    rows = []
    for (group, family), part in val.groupby(["val_group", "family"]):
        cut = pd.qcut(part["number"].rank(method="dense"), min(args.bins, part["number"].nunique()), labels=False)
        for b, sub in part.groupby(cut):
            other = val[(val["val_group"] == group) & (val["y"] != sub["y"].iloc[0])]
            both = pd.concat([sub, other])
            m = binary_metrics(both["y"].to_numpy(), both["score"].to_numpy(), card.threshold)
            ci = bootstrap_ci(both["y"].to_numpy(), both["score"].to_numpy(), card.threshold, 500).set_index("metric")
            rate = "specificity" if sub["y"].iloc[0] == 0 else "sensitivity"
            rows.append({"val_group": group, "family": family, "ids": f"{sub['number'].min()}-{sub['number'].max()}",
                         "n": len(sub), "auc_vs_other_class": m["roc_auc"],
                         "auc_ci": f"{ci.loc['roc_auc', 'ci_low']:.3f}-{ci.loc['roc_auc', 'ci_high']:.3f}",
                         rate: m[rate], f"{rate}_ci": f"{ci.loc[rate, 'ci_low']:.3f}-{ci.loc[rate, 'ci_high']:.3f}",
                         "mean_score": sub["score"].mean()})
    table = pd.DataFrame(rows)
    print(f"model {card.model_id}, threshold {card.threshold:.4f}, temperature {card.temperature:.3f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    table.to_csv(os.path.join(args.run_dir, "validation_by_range.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
