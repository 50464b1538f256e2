"""Issue 32 item 4, same-archive controls: on a training run's validation part (lung CT and breast US:
a random part of the same archive, as their held-back 20% is), what does `score.adapt=auto` decide, and
would forced adaptation (`bn`) hurt?

The model's drift reference is measured on its validation part, so `auto` on that same part would
compare it with itself. The validation part is therefore split in two seeded halves (stratified by
class): half A gets the drift reference (a copy of the artifact, medclf.monitor.reference.add_reference,
same weights and model id) and half B plays the archive being scored. For each --run:
  * the model's stored verdict (card `adaptation`);
  * `auto`'s decision on half B, made by scoring's own code (medclf.score.adaptation.prepare_adaptation:
    seeded sample, drift comparison against half A, verdict), with the drift statistics that flagged;
  * macro-F1 and accuracy on half B without (`none`) and with BatchNorm statistics re-estimated on a
    seeded score.adapt_sample of it (`bn`, as score.adapt=bn with the override would do), each with a
    95% bootstrap CI, and the paired difference bn - none with its CI.
Labels only score and split; adaptation never reads them. A reference of half the validation part has
less power than the whole one, so this control is weaker at catching drift than scoring would be.

    nice python benchmarks/adapt_controls.py --run RUN_A --run RUN_B --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medclf.config import Config  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray, to_model_input  # noqa: E402
from medclf.model.adapt import fit_profile  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities  # noqa: E402
from medclf.score.adaptation import prepare_adaptation, verdict_of  # noqa: E402


def probabilities(model, x: torch.Tensor, temperature: float, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([class_probabilities(model(to_model_input(x[i:i + batch])), temperature).numpy()
                               for i in range(0, len(x), batch)])


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def paired_bootstrap(y, pred_a, pred_b, n_classes, resamples=1000, seed=0) -> dict:
    """Percentile CIs of macro-F1 for a and b and of b - a, resampling images (stratified by class)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(n_classes) if (y == c).any()]
    a, b = [], []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(ix, len(ix)) for ix in by_class])
        a.append(macro_f1(y[idx], pred_a[idx], n_classes))
        b.append(macro_f1(y[idx], pred_b[idx], n_classes))
    a, b = np.array(a), np.array(b)
    ci = lambda v: [float(x) for x in np.percentile(v, [2.5, 97.5])]  # noqa: E731
    return {"none_ci": ci(a), "bn_ci": ci(b), "delta_ci": ci(b - a)}


def control(run: str, seed: int, resamples: int) -> dict:
    from medclf.monitor.reference import add_reference

    model, card = load_artifact(os.path.join(run, "model"))
    cfg = Config.model_validate({**card.config, "score": {**card.config.get("score", {}), "adapt": "auto"}})
    df = pd.read_parquet(os.path.join(run, "splits.parquet"))
    val = df[df["split"] == "val"].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    half_a = np.zeros(len(val), bool)
    for _, g in val.groupby("label"):
        half_a[rng.permutation(g.index.to_numpy())[: len(g) // 2]] = True
    ref_part, val = val[half_a], val[~half_a].reset_index(drop=True)
    paths = list(val["path"])
    y = np.array([card.classes.index(label) for label in val["label"]])
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        model_path = os.path.join(out, "model_ref_half_a")
        add_reference(os.path.join(run, "model"), model_path, list(ref_part["path"]), list(ref_part["label"]), seed)
        card = load_artifact(model_path)[1]
        decision = prepare_adaptation(cfg, card, model_path, paths, os.path.join(out, "pred"), "adapt-control",
                                      source=run)
    spec = card.preprocess_spec
    x = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in paths]))
    p_none = probabilities(model, x, card.temperature)
    adapted = copy.deepcopy(model)
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:cfg.score.adapt_sample])
    _, fit = fit_profile(adapted, card, x[pick].numpy(), seed)
    p_bn = probabilities(adapted, x, card.temperature)
    pred_none, pred_bn = p_none.argmax(1), p_bn.argmax(1)
    k = len(card.classes)
    row = {"run": os.path.basename(run.rstrip("/")), "model_id": card.model_id, "n": len(y),
           "n_reference": int(half_a.sum()),
           "verdict": verdict_of(card), "verdict_why": (card.adaptation or {}).get("why"),
           "auto_adapted": decision.adapted, "auto_reason": decision.reason, "auto_flags": decision.flags,
           "bn_layers_adapted": len(fit.adapted), "bn_layers_kept": len(fit.skipped),
           "macro_f1_none": macro_f1(y, pred_none, k), "macro_f1_bn": macro_f1(y, pred_bn, k),
           "accuracy_none": float((pred_none == y).mean()), "accuracy_bn": float((pred_bn == y).mean()),
           **paired_bootstrap(y, pred_none, pred_bn, k, resamples, seed), "seconds": round(time.time() - start)}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="training run folder (model/, splits.parquet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_adapt_controls")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [control(run, args.seed, args.resamples) for run in args.run]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adapt_controls.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| run | n (half B) / reference (half A) | verdict | auto | macro-F1 none | macro-F1 bn (forced) | bn - none |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["delta_ci"]
        lines.append(f"| {r['run']} | {r['n']} / {r['n_reference']} | {r['verdict']} | "
                     f"{r['auto_reason']} | {r['macro_f1_none']:.3f} ({r['none_ci'][0]:.3f}–{r['none_ci'][1]:.3f}) | "
                     f"{r['macro_f1_bn']:.3f} ({r['bn_ci'][0]:.3f}–{r['bn_ci'][1]:.3f}) | "
                     f"{r['macro_f1_bn'] - r['macro_f1_none']:+.3f} ({lo:+.3f} to {hi:+.3f}) |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(args.out, "adapt_controls.md"), "w").write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
