"""Commands that report on predictions: drift and evaluate."""

from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

from medclf import storage
from medclf.cli.parsers import config_from
from medclf.config import Config, ConfigError
from medclf.ops.runs import new_run_id, run_folder
from medclf.ops.tracking import log_job


def cmd_drift(args: argparse.Namespace) -> int:
    from medclf.monitor.drift import DRIFT_EXIT

    cfg = config_from(args, None, {"score.output": "predictions", "score.model": "model", "drift.output": "output"})
    if not cfg.score.output or not cfg.score.model:
        raise ConfigError("drift needs the predictions (--predictions or score.output) and the model (--model or "
                          "score.model)")
    if sum(bool(v) for v in (args.scoring_run, args.run_date, args.date_from or args.date_to)) > 1:
        raise ConfigError("drift compares one selection: --scoring-run, --run-date, or --from/--to")
    output = cfg.drift.output or storage.join(run_folder(cfg, new_run_id(cfg)), "drift")
    result = drift_report(cfg, cfg.score.model, cfg.score.output, output, run_id=args.scoring_run,
                          run_date=args.run_date, date_from=args.date_from, date_to=args.date_to)
    return DRIFT_EXIT if result.flagged else 0


def drift_report(cfg: Config, model: str, predictions: str, output: str, **selection):
    from medclf.monitor.drift import run_drift

    result = run_drift(cfg.drift, model, predictions, output, **selection)
    flagged = result.table[result.table["flag"]]
    for r in flagged.itertuples():
        print(f"DRIFT {r.statistic}: {r.value:.4g} (validation {r.reference:.4g}), p_adj {r.p_adjusted:.2g}"
              + ("" if np.isnan(r.psi) else f", PSI {r.psi:.3f}"))
    print(f"drift report: {len(flagged)} flag(s) of {len(result.table)} statistics -> {output}/drift.html")
    return result


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medclf.model.artifact import load_card
    from medclf.report.evaluate import dropped_note

    cfg = config_from(args, options={"evaluate.predictions": "predictions", "evaluate.labels": "labels",
                                      "evaluate.output": "output", "score.model": "model",
                                      "evaluate.model_id": "model_id"})
    if not cfg.evaluate.predictions:
        raise ConfigError("evaluate needs predictions (--predictions or evaluate.predictions)")
    model_id = cfg.evaluate.model_id
    if cfg.score.model:
        card = load_card(cfg.score.model)
        classes, positive = card.classes, card.positive_class
        model_id = model_id or card.model_id
    elif cfg.data.classes:
        classes, positive = cfg.data.classes, cfg.data.positive_class
    else:
        raise ConfigError("evaluate needs the class names: --model ARTIFACT, or data.classes in the config")
    run_id = new_run_id(cfg)
    run_dir = run_folder(cfg, run_id)
    output = cfg.evaluate.output or storage.join(run_dir, "report")
    report = evaluation_for(cfg, cfg.evaluate.predictions, output, classes, positive, cfg.evaluate.labels, model_id)
    print_metrics(report.metrics)
    if report.out_of_scope and report.out_of_scope["n"]:
        oos = report.out_of_scope
        print(f"out of scope: {oos['n']} file(s), {100 * oos['rate']:.1f}% of those seen ({oos['reasons']}); "
              "not counted as predictions")
    if len(report.metrics):
        log_job(cfg, "evaluate", run_id, model_id, report.metrics.iloc[0].to_dict())
    print(dropped_note(report.rows_dropped, model_id or "the one model present"))
    print(f"report -> {output}")
    return 0


def evaluation_for(cfg: Config, predictions: str, output: str, classes: list[str], positive: Optional[str],
                   labels: Optional[str], model_id: Optional[str] = None):
    from medclf.report.evaluate import run_evaluation

    ec = cfg.evaluate
    return run_evaluation(predictions, output, classes, positive, labels, cfg.data.class_map, ec.bootstrap_resamples,
                          ec.bootstrap_seed, ec.group_by, ec.target_sensitivity, ec.allow_unscored, model_id,
                          cfg.report.show_paths)


def print_metrics(metrics) -> None:
    cols = [c for c in ("rule", "n", "threshold", "accuracy", "sensitivity", "specificity", "precision", "f1",
                        "roc_auc", "pr_auc") if c in metrics.columns]
    print(metrics[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
