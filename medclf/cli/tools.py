"""Commands around a trained model: export, site calibration, prior shift, ensembles, and the runs list."""

from __future__ import annotations

import argparse
import sys

from medclf import storage
from medclf.cli.parsers import config_from
from medclf.config import ConfigError


def cmd_export(args: argparse.Namespace) -> int:
    from medclf.model.export import export_artifact

    storage.check_input_url(args.model)
    doc = export_artifact(args.model, args.output, args.format, args.site_profile)
    baked = f" with site profile {doc['adaptation_id'][:12]}" if doc["adaptation_id"] else ""
    print(f"exported {doc['model_id']}{baked} -> {args.output}: {', '.join(doc['files'])} + contract.json")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import json

    from medclf.model import site_calibration
    from medclf.model.site_fit import calibrate_site

    storage.check_input_url(args.model)
    card, cal = calibrate_site(args.model, args.labelled, args.extensions, args.threshold_rule,
                               args.target_sensitivity, args.map, args.min_films, args.min_per_class,
                               left_out=lambda message: print(f"left out: {message}", file=sys.stderr))
    site_calibration.save(cal, args.out)
    r = cal.report
    print(f"site calibration {cal.calibration_id} for {card.model_id} -> {args.out}")
    print(f"k={cal.fitted_on['k']} films {json.dumps(cal.fitted_on['per_class'])}; map {cal.map}: temperature "
          f"{cal.temperature:.4f} (model {card.temperature:.4f}), bias {[round(b, 4) for b in cal.bias]}")
    if cal.threshold is not None:
        print(f"threshold {cal.threshold:.4f} (model {card.threshold}): {cal.threshold_rule}")
        print(f"ECE on the k films (in sample) {r['ece_before']:.4f} -> {r['ece_after']:.4f}; log loss "
              f"{r['log_loss_before']:.4f} -> {r['log_loss_after']:.4f}")
        if "out_of_bag" in r:
            o = r["out_of_bag"]
            print(f"what k allows (95% CI, out-of-bag bootstrap, threshold re-chosen per resample): sensitivity "
                  f"{o['sensitivity']:.3f} ({o['sensitivity_ci'][0]:.3f}-{o['sensitivity_ci'][1]:.3f}), specificity "
                  f"{o['specificity']:.3f} ({o['specificity_ci'][0]:.3f}-{o['specificity_ci'][1]:.3f})")
    return 0


def ensemble_config(args: argparse.Namespace, first_member: str):
    """The config whose `ood` and `data` sections fit the ensemble's out-of-scope guard: --config and --set,
    the first member's recorded data.modalities unless those set them."""
    import json

    from medclf.config import load_config
    from medclf.model.artifact import load_card

    modalities = (load_card(first_member).config.get("data") or {}).get("modalities") or []
    inherited = [f"data.modalities={json.dumps(modalities)}"] if modalities else []
    return load_config(args.config, inherited + list(args.overrides))


def cmd_ensemble(args: argparse.Namespace) -> int:
    from medclf.model.artifact import read_artifact
    from medclf.model.site_fit import labelled_sample
    from medclf.train.ensemble import check_members, label_indices, make_ensemble, threshold_rule

    for path in args.members:
        storage.check_input_url(path)
    if len(args.members) < 2:
        raise ConfigError(f"--members: an ensemble needs at least 2 members, got {len(args.members)}")
    # Everything that can be refused is refused before any image is read or any network built.
    cards = [read_artifact(path, weights=False) for path in args.members]
    check_members(cards)
    if args.target_sensitivity is not None and not 0.0 < args.target_sensitivity <= 1.0:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {args.target_sensitivity:g}")
    threshold_rule(cards, args.threshold_rule, args.target_sensitivity)
    cfg = ensemble_config(args, args.members[0])
    paths, labels = labelled_sample(args.labelled, [], args.extensions)
    label_indices(labels, cards[0].card.classes, args.labelled)
    card = make_ensemble(args.members, args.out, paths, labels, cfg, source=args.labelled,
                         rule=args.threshold_rule, target_sensitivity=args.target_sensitivity)
    films = card.metrics["labelled_films"]
    print(f"ensemble {card.model_id} of {len(args.members)} members -> {args.out}")
    print(f"{films['n']} labelled films: threshold {card.threshold} ({card.threshold_rule}); "
          + ", ".join(f"{k} {films[k]:.4f}" for k in ("roc_auc", "sensitivity", "specificity") if k in films))
    return 0


def cmd_prior(args: argparse.Namespace) -> int:
    import json

    from medclf.model import site_calibration
    from medclf.model.artifact import load_card
    from medclf.report.prior import prior_report

    card = load_card(args.model)
    cal = site_calibration.load(args.site_calibration, card) if args.site_calibration else None
    report = prior_report(args.predictions, card, cal, args.scoring_run, args.train_prior)
    print(json.dumps(report, indent=2))
    if args.out:
        storage.write_atomic(args.out, json.dumps(report, indent=2).encode())
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from medclf.ops.tracking import list_runs, tracking_uri

    cfg = config_from(args)
    uri = tracking_uri(cfg)
    if uri is None:
        raise ConfigError("no MLflow store: tracking is off, or run.root is on object storage (set "
                          "MLFLOW_TRACKING_URI or tracking.uri)")
    import pandas as pd

    runs = list_runs(uri, args.limit)
    if runs.empty:
        print(f"no runs in {uri}")
        return 0
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        print(runs.to_string(index=False))
    print(f"({len(runs)} run(s) in {uri}; browse with `mlflow ui --backend-store-uri {uri}`)")
    return 0
