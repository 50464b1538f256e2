"""Bring a trained artifact's adaptation record (card `adaptation`, medclf.train.adapt_verdict) up to
the current code without retraining: the verdict re-decided by the current rule from the per-set AUCs
the card already holds (or re-measured with --remeasure). The weights are untouched, so the copy at
--out has the same model id.

--operating-point also stores a candidate that was measured and rejected (session 22,
docs/adaptation.md): a temperature and threshold fitted, by the card's own rules, on the validation
part adapted to itself, under `adaptation.operating_point`. The product ignores that field;
benchmarks/adaptation.py scores it as its 'bn + adapted operating point' rows.

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
from medclf.imaging.preprocess import to_model_input  # noqa: E402
from medclf.model.adapt import fit_bn_statistics, tensor_batches  # noqa: E402
from medclf.model.calibration import softmax_with_temperature  # noqa: E402
from medclf.train.adapt_verdict import RULE, decide, measure_verdict, verdict_line  # noqa: E402
from medclf.train.finish import decision_threshold, fit_calibration  # noqa: E402


def adapted_operating_point(cfg, model: torch.nn.Module, val_x: np.ndarray, y: np.ndarray, positive_index,
                            group: str) -> dict:
    """Temperature and threshold fitted by the card's rules on the validation images scored with BatchNorm
    statistics re-estimated on those images themselves (the seeded score.adapt_sample of them)."""
    import copy

    pick = np.sort(np.random.default_rng(cfg.run.seed).permutation(len(val_x))[:cfg.score.adapt_sample])
    adapted = copy.deepcopy(model).eval()
    fit_bn_statistics(adapted, cfg.model.arch, cfg.model.transfer, tensor_batches(val_x[pick]))
    x = torch.from_numpy(np.ascontiguousarray(val_x, np.float32))
    with torch.inference_mode():
        log_probs = np.concatenate([torch.log_softmax(adapted(to_model_input(x[i:i + 64])).float(), 1).numpy()
                                    for i in range(0, len(x), 64)])
    fitted_on = f"{group} validation adapted to itself ({len(pick)} images)"
    temperature, calibration = fit_calibration(log_probs, y, positive_index, fitted_on)
    probs = softmax_with_temperature(log_probs, temperature).astype(np.float32)
    threshold, rule = decision_threshold(cfg, adapted, temperature, probs, lambda: val_x, y, positive_index, group)
    return {"temperature": float(temperature), "threshold": None if threshold is None else float(threshold),
            "threshold_rule": f"{rule}, BatchNorm adapted", "calibration": calibration, "fitted_on": fitted_on}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--splits", required=True, help="the training run's splits.parquet")
    ap.add_argument("--out", required=True, help="folder for the copy with the new adaptation record")
    ap.add_argument("--remeasure", action="store_true", help="measure the per-set AUCs again (slow)")
    ap.add_argument("--operating-point", action="store_true",
                    help="also store the rejected adapted operating point (for benchmarks/adaptation.py)")
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
    if args.operating_point and record.get("adapted_layers"):
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
