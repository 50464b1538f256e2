"""Does a site profile change what the out-of-scope guard refuses? (issue 32 / 33)

A profile is fitted on a sample of one validation part of a run (medclf.model.adapt.fit_profile), then
every film of that part is scored by the scoring Predictor without and with it. A third row recomputes
the guard as scoring did before session 23: on the adapted network's features, against the bank of
the network as trained. Refusals k/n with 95% Wilson CIs.

    MEDCLF_UID_KEY=x PYTHONPATH=. python benchmarks/guard_under_profile.py --model RUN/model \\
        --splits RUN/splits.parquet [--part patient] [--sample 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from scipy import stats

from medclf.imaging.stage import load_images
from medclf.model.adapt import fit_profile
from medclf.model.artifact import load_artifact, load_card
from medclf.model.records import input_gate
from medclf.model.site_profile import write_profile
from medclf.monitor.drift import wilson
from medclf.score.predictor import Predictor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--part", default="patient", help="val_group of the validation part (default: %(default)s)")
    ap.add_argument("--sample", type=int, default=300, help="films the profile is fitted on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (the ratio's CI is over them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = load_card(args.model)
    splits = pd.read_parquet(args.splits)
    paths = list(splits[(splits.split == "val") & (splits.val_group == args.part)].path)
    batches = list(load_images({"path": np.array(paths, object)}, card.preprocess, rows_per_batch=64,
                               gate=input_gate(card)))
    decoded = np.concatenate([b["pixels"][np.array([s is None for s in b["status"]])] for b in batches])
    model, _ = load_artifact(args.model)
    pick = np.random.default_rng(0).permutation(len(decoded))[:args.sample]
    profile, _ = fit_profile(model, card, decoded[pick], 0, source=f"{args.part} part")
    path = write_profile(profile, tempfile.mkdtemp())
    plain = Predictor(args.model, "plain", threads=args.threads)
    adapted = Predictor(args.model, "adapted", threads=args.threads, site_profile=path)
    plain(batches[0]), adapted(batches[0])  # warm-up
    rows, ratios = {}, []
    for _ in range(args.repeats):  # each repeat: without, with, without again (its own baseline)
        seconds = {}
        for name, predictor in (("plain", plain), ("adapted", adapted), ("plain again", plain)):
            started = time.perf_counter()
            rows[name] = pa.concat_tables([predictor(b) for b in batches]).to_pandas()
            seconds[name] = time.perf_counter() - started
        ratios.append(seconds["adapted"] / ((seconds["plain"] + seconds["plain again"]) / 2))
    rows_plain, rows_adapted = rows["plain"], rows["adapted"]
    before = []  # the guard on the adapted network's own features (scoring before session 23)
    for b in batches:
        ok = np.array([s is None for s in b["status"]])
        if ok.any():
            logits, features = adapted.logits_and_features(b["pixels"][ok])
            before.append(adapted.domain.scores(features, logits))
    before = np.concatenate(before)
    threshold = adapted.domain.record.threshold
    refused_now = int((rows_adapted.status == "out_of_scope").sum())
    by_feature_now = int((rows_adapted.ood_score > threshold).sum())
    n = len(rows_plain)
    print(f"model {card.model_id}, {args.part} part: {n} films; profile {profile.profile_id[:12]} on {len(pick)}")
    for name, k in (("no profile", int((rows_plain.status == "out_of_scope").sum())),
                    ("profile, guard reading the network as trained (now)", refused_now),
                    ("profile, guard reading the adapted network (before)",
                     refused_now - by_feature_now + int((before > threshold).sum()))):
        lo, hi = wilson(k, n)
        print(f"{name}: {k}/{n} = {100 * k / n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})")
    ratios = np.array(ratios)
    half = (stats.t.ppf(0.975, len(ratios) - 1) * ratios.std(ddof=1) / np.sqrt(len(ratios))
            if len(ratios) > 1 else float("nan"))
    print(f"Predictor time with the profile / without (baseline before and after, {len(ratios)} repeats on "
          f"the {n} films): x{ratios.mean():.2f} (95% CI {ratios.mean() - half:.2f}-{ratios.mean() + half:.2f}); "
          f"each: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"threshold {threshold:.4f}; median ood_score: adapted features {np.median(before):.3f}, "
          f"as trained {np.nanmedian(rows_adapted.ood_score):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
