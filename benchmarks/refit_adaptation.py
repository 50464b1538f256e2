"""Bring a trained artifact's adaptation record (card `adaptation`, medclf.train.adapt_verdict) up to
the current code without retraining: the verdict re-decided by the current rule from the per-set AUCs
the card already holds (or re-measured with --remeasure), and the adapted operating point
(medclf.train.finish.adapted_operating_point) fitted on the validation part the threshold was chosen on.
The weights are untouched, so the copy at --out has the same model id.

    nice python benchmarks/refit_adaptation.py --model RUN/model --splits RUN/splits.parquet --out RUN/model_adapt

The images are decoded as training's validation was (medclf.imaging.decode + preprocess_gray).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medclf.config import Config  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402
from medclf.model.artifact import load_artifact, republish_with_files  # noqa: E402
from medclf.train.adapt_verdict import RULE, decide, measure_verdict, verdict_line  # noqa: E402
from medclf.train.finish import adapted_operating_point  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--splits", required=True, help="the training run's splits.parquet")
    ap.add_argument("--out", required=True, help="folder for the copy with the new adaptation record")
    ap.add_argument("--remeasure", action="store_true", help="measure the per-set AUCs again (slow)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, card = load_artifact(args.model)
    cfg = Config.model_validate(card.config)
    spec = card.preprocess_spec
    df = pd.read_parquet(args.splits)
    val = df[df["split"] == "val"]
    part = "family" if (val.get("val_group") == "family").any() else "patient"
    val = val[val.get("val_group", pd.Series("patient", val.index)).fillna("patient") == part]
    y = np.array([card.classes.index(label) for label in val["label"]])
    start = time.time()
    x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in val["path"]])
    print(f"{len(x)} {part} validation images decoded in {time.time() - start:.0f}s", flush=True)
    record = dict(card.adaptation or {})
    if args.remeasure or not record.get("sets"):
        record = measure_verdict(model.eval(), card.arch, cfg.model.transfer, x, y, card.positive_index,
                                 card.temperature, spec.mean, spec.std, cfg.score.adapt_sample, cfg.run.seed)
    else:
        verdict, basis, why = decide(record["sets"])
        record.update(verdict=verdict, basis=basis, why=why, rule=RULE)
    print(verdict_line(record), flush=True)
    if record.get("adapted_layers"):
        record["operating_point"] = adapted_operating_point(cfg, model.eval(), x, y, card.positive_index, part)
    card.adaptation = record
    republish_with_files(args.model, args.out, card, {})
    point = record.get("operating_point", {})
    print(json.dumps({"verdict": record["verdict"], "basis": record.get("basis"), "card_temperature": card.temperature,
                      "card_threshold": card.threshold, "adapted_temperature": point.get("temperature"),
                      "adapted_threshold": point.get("threshold"), "seconds": round(time.time() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
