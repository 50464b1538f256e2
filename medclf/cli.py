"""`medclf` command line: phantoms, train, score, drift, evaluate, explain, serve, export, runs, demo.

Each subcommand: parse arguments -> load and validate the config (failing before any work) ->
one call into the library. `jobs/*.py` are the same subcommands under their own names, for
`ray job submit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Optional

from medclf import storage
import numpy as np

from medclf.config import Config, ConfigError, load_config
from medclf.errors import UserError
from medclf.ops import logs
from medclf.ops.tracking import log_job
from medclf.imaging.confine import check_locations
from medclf.ops.runs import (check_shared_storage, discard_unused_run_folder, init_ray, new_run_id, run_folder,
                             save_resolved_config, use_shared_root)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


# ---------------------------------------------------------------- helpers

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=DEFAULT_CONFIG,
        help="YAML config (every key: docs/configuration.md); default: %(default)s",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 --set model.arch=resnet18 (repeatable; "
        "values are parsed as YAML)",
    )
    p.add_argument("--run-id", help="run id (folder name under run.root); default: <run.name>-<UTC time>")
    p.add_argument("--run-root", help="folder or s3:// prefix holding run folders (run.root); default from config")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (medclf's own loggers) and Ray's own detail (Ray Data plans and progress, "
                        "Ray Train reports)")


def _add_extensions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extensions", nargs="+", metavar="SUFFIX",
                   help="file suffixes to take from a folder or glob, e.g. --extensions .jpg .jpeg .png .dcm; the "
                        "entry 'dicom' also takes DICOM files without a suffix (score.extensions)")


def _config_from(args: argparse.Namespace, extra: Optional[list[str]] = None,
                 options: Optional[dict[str, str]] = None) -> Config:
    """The config file, then --set overrides and `extra` (parsed as YAML), then the command's own
    options `{config key: argument name}`, taken as the strings they are (a path with '#' or '~'
    is a path, not YAML)."""
    options = {"run.id": "run_id", "run.root": "run_root", **(options or {})}
    values = {key: getattr(args, name) for key, name in options.items() if getattr(args, name, None)}
    if getattr(args, "extensions", None):  # a list, not a string: passed as an override's YAML
        extra = list(extra or []) + [f"score.extensions={json.dumps(args.extensions)}"]
    return load_config(args.config, list(args.overrides) + (extra or []), values)


# ---------------------------------------------------------------- parsers


def phantoms_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Write a labelled synthetic dataset (PNG + DICOM + manifest).")
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--config", default=None, help="YAML config whose 'phantoms' section sets the defaults")
    p.add_argument("--n-train", type=int, help="number of training images")
    p.add_argument("--n-test", type=int, help="number of test images")
    p.add_argument("--image-size", type=int, help="side of the square images in pixels")
    p.add_argument("--formats", nargs="+", choices=["png", "dcm"], help="file formats to write for each image")
    p.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    return p


def train_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a classifier with Ray Train and write a model artifact into the run folder."
    )
    _add_common(p)
    p.add_argument("--data", help="labelled image folder or s3:// prefix (data.root)")
    p.add_argument("--manifest", help="labelled manifest Parquet/CSV instead of a folder (data.manifest)")
    p.add_argument("--epochs", type=int, help="maximum epochs (train.epochs)")
    p.add_argument("--workers", type=int, help="number of Ray Train workers (train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    p.add_argument("--restart", action="store_true",
                   help="with a re-used --run-id: drop its checkpoints and start over (needed when the classes, "
                        "architecture, preprocessing or data changed)")
    return p


def score_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Score image files (PNG/JPEG/DICOM) with a model artifact; write predictions Parquet."
    )
    _add_common(p)
    p.add_argument("--input", help="folder, glob, s3:// prefix, manifest of files, or dicomweb://host/path?query "
                   "(a PACS: docs/pacs.md) to score (score.input)")
    p.add_argument("--model", help="model artifact folder, local or s3:// (score.model)")
    p.add_argument("--output", help="predictions folder (score.output); default <run folder>/predictions")
    _add_extensions(p)
    p.add_argument("--batch-size", type=int, help="images per inference batch (score.batch_size)")
    p.add_argument("--num-actors", type=int, help="inference actors in the pool (score.num_actors)")
    p.add_argument("--use-gpu", action="store_true", help="run the model on GPU, one per actor (score.use_gpu)")
    p.add_argument("--rescore", action="store_true",
                   help="score every file again, even those this model already scored (score.rescore)")
    p.add_argument("--site-calibration", help="site calibration file from `medclf calibrate` (score.site_calibration)")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any file failed to score")
    return p


def drift_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Compare predictions (a scoring run, a run date or a date range) with the model's "
        "validation reference. Writes drift.parquet, PNGs and drift.html. Exit status 4 when any drift flag "
        "trips (0: none; 2: bad input; see docs/usage.md, 'Drift reports')."
    )
    _add_common(p)
    p.add_argument("--predictions", help="predictions folder or s3:// prefix (default score.output)")
    p.add_argument("--model", help="model artifact whose reference and rows are compared (score.model)")
    p.add_argument("--scoring-run", help="only the rows of this scoring run id")
    p.add_argument("--run-date", help="only the rows of this run date (YYYY-MM-DD)")
    p.add_argument("--from", dest="date_from", help="first run date of a range (inclusive)")
    p.add_argument("--to", dest="date_to", help="last run date of a range (inclusive)")
    p.add_argument("--output", help="report folder (drift.output); default <run folder>/drift")
    return p


def evaluate_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate predictions against labels; write a report.")
    _add_common(p)
    p.add_argument("--predictions", help="predictions Parquet folder from `score` (evaluate.predictions)")
    p.add_argument("--labels", help="manifest with path,label (evaluate.labels); default: parent folder names")
    p.add_argument("--model", help="model artifact, for class names and positive class (score.model); only its rows "
                                    "are evaluated")
    p.add_argument("--model-id", help="evaluate this model id's rows (evaluate.model_id); default: the --model's id, "
                                      "or the only model in the predictions")
    p.add_argument("--output", help="report folder (evaluate.output); default <run folder>/report")
    return p


def explain_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Grad-CAM heatmaps (PNG overlay + .npy array per image, and an index Parquet)."
    )
    _add_common(p)
    p.add_argument("--model", help="model artifact folder, local or s3:// (score.model)")
    p.add_argument("--input", help="folder, glob, s3:// prefix or manifest of files to explain (score.input)")
    _add_extensions(p)
    p.add_argument("--flagged", metavar="PREDICTIONS",
                   help="instead of --input: the files this model flagged positive in a predictions folder")
    p.add_argument("--output", help="heatmaps folder (explain.output); default <run folder>/explanations")
    p.add_argument("--layer", help="layer to explain, e.g. layer4 (explain.layer); default per architecture")
    p.add_argument("--target", help="class to explain, or 'predicted' (explain.target)")
    return p


def serve_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Online endpoint (Ray Serve): POST /predict with an image, GET /healthz, GET /model.")
    _add_common(p)
    p.add_argument("--model", help="model artifact folder, local or s3:// (serve.model)")
    p.add_argument("--host", help="address to listen on (serve.host); default 127.0.0.1")
    p.add_argument("--port", type=int, help="port (serve.port); default 8000")
    p.add_argument("--site-profile", help="site profile (.npz) of this model to answer with (serve.site_profile)")
    p.add_argument("--site-calibration", help="site calibration file from `medclf calibrate` (serve.site_calibration)")
    return p


def runs_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="List the tracked runs (MLflow) with their key figures, newest first.")
    _add_common(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    return p


def export_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Export a model artifact as ONNX and/or TorchScript. Writes contract.json (inputs, "
                               "preprocessing, classes, threshold) beside the files.")
    p.add_argument("--model", required=True, help="model artifact folder, local or s3://")
    p.add_argument("--output", required=True, help="folder (local or s3://) for the exported files")
    p.add_argument("--format", nargs="+", default=["onnx", "torchscript"], choices=["onnx", "torchscript"],
                   help="formats to write (default: both)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (medclf's own loggers) and Ray's own detail (Ray Data plans and progress, "
                        "Ray Train reports)")
    return p


def calibrate_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from medclf.model.site_fit import MAP_CHOICES, MIN_FILMS, MIN_PER_CLASS, THRESHOLD_RULES

    p = argparse.ArgumentParser(
        prog=prog, description="Re-fit the temperature and threshold on k labelled films of a new site. The result is a "
                               "site calibration file that scoring and serving apply (docs/site_calibration.md).")
    p.add_argument("--model", required=True, help="model artifact folder, local or s3://")
    p.add_argument("--labelled", required=True,
                   help="the site's labelled films: a folder of class subfolders, or a manifest (.parquet/.csv with "
                        "path and label)")
    p.add_argument("--out", required=True, help="site calibration file to write (e.g. site_calibration.json)")
    p.add_argument("--threshold-rule", default="model", choices=THRESHOLD_RULES,
                   help="how the new threshold is chosen (default: the model's own rule; keep: the model's threshold)")
    p.add_argument("--target-sensitivity", type=float, help="for target_sensitivity (default: the model's)")
    p.add_argument("--map", default="auto", choices=MAP_CHOICES,
                   help="temperature, platt (scale + bias), or auto: platt only where cross-validation shows it helps")
    p.add_argument("--min-films", type=int, default=MIN_FILMS, help="refuse fewer labelled films (default %(default)s)")
    p.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS,
                   help="refuse fewer films of any class (default %(default)s)")
    p.add_argument("--extensions", nargs="+", default=[".png", ".jpg", ".jpeg", ".dcm"],
                   help="image files to take from a folder (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (medclf's own loggers)")
    return p


def prior_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Label-free class-prior re-estimation (EM, Saerens et al. 2002) over the calibrated "
                               "probabilities of a predictions folder; prints (and writes) the estimate and the moved "
                               "threshold.")
    p.add_argument("--predictions", required=True, help="predictions folder or s3:// prefix from `score`")
    p.add_argument("--model", required=True, help="the model artifact whose rows are used")
    p.add_argument("--scoring-run", help="only the rows of this scoring run id")
    p.add_argument("--site-calibration", help="the site calibration those rows were scored with (its films' class "
                                              "shares are the prior the probabilities were calibrated under)")
    p.add_argument("--train-prior", nargs="+", type=float, help="class shares the probabilities were calibrated "
                                                               "under, in class order (default: from the card)")
    p.add_argument("--out", help="also write the report here as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (medclf's own loggers)")
    return p


def demo_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="End to end on phantoms: generate -> train -> score -> evaluate, in one run folder."
    )
    _add_common(p)
    return p


# ---------------------------------------------------------------- commands


def cmd_phantoms(args: argparse.Namespace) -> int:
    from medclf.data.phantoms import generate

    cfg = load_config(args.config) if args.config else Config()
    pc = cfg.phantoms
    manifest = generate(
        args.out,
        n_train=args.n_train or pc.n_train,
        n_test=args.n_test or pc.n_test,
        image_size=args.image_size or pc.image_size,
        formats=tuple(args.formats or pc.formats),
        positive_fraction=pc.positive_fraction,
        seed=cfg.run.seed if args.seed is None else args.seed,
    )
    print(f"wrote {len(manifest)} files to {args.out} (manifest: {os.path.join(args.out, 'manifest.parquet')})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medclf.train.driver import run_training
    from medclf.train.inputs import prepare_data

    extra = []
    if args.epochs:
        extra.append(f"train.epochs={args.epochs}")
    if args.workers:
        extra.append(f"train.num_workers={args.workers}")
    if args.use_gpu:
        extra.append("train.use_gpu=true")
    cfg = _config_from(args, extra, {"data.root": "data", "data.manifest": "manifest"})
    prepared = prepare_data(cfg)  # a data problem fails here, before Ray starts or a folder is made
    init_ray(cfg)
    use_shared_root(cfg)
    run_id = new_run_id(cfg)
    run_dir = run_folder(cfg, run_id)
    save_resolved_config(cfg, run_dir, "train")
    result = run_training(cfg, run_dir, prepared, restart=args.restart)
    v = result.card.metrics["validation"]
    print(f"model {result.card.model_id} -> {result.model_path}")
    names = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1") if result.card.positive_class else \
        ("accuracy", "balanced_accuracy", "roc_auc", "f1")
    print(f"validation (best epoch {v['best_epoch']}): " + ", ".join(f"{k} {v[k]:.4f}" for k in names if k in v)
          + ("" if result.card.positive_class else " (macro)"))
    if not result.card.positive_class:
        print("validation recall per class: " + ", ".join(
            f"{c} {v[f'recall_{k}']:.4f}" for k, c in enumerate(result.card.classes)))
    print(f"validation report -> {storage.join(run_dir, 'validation_report')}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from medclf.score.batch import run_scoring

    extra = []
    for opt in ("batch_size", "num_actors"):
        if getattr(args, opt):
            extra.append(f"score.{opt}={getattr(args, opt)}")
    if args.use_gpu:
        extra.append("score.use_gpu=true")
    if args.rescore:
        extra.append("score.rescore=true")
    cfg = _config_from(args, extra, {"score.input": "input", "score.model": "model", "score.output": "output",
                                     "score.site_calibration": "site_calibration"})
    from medclf.model.artifact import load_card
    from medclf.imaging.dicomweb import is_dicomweb
    from medclf.score.preflight import check_inputs, check_model, check_uid_key

    pacs = is_dicomweb(cfg.score.input)  # a PACS over DICOMweb (docs/pacs.md)
    check_locations(None if pacs else cfg.score.input, cfg.score.output)  # schemes first (medclf.imaging.confine)
    if pacs:
        from medclf.score.pacs import check_pacs_input, run_pacs_scoring

        check_pacs_input(cfg)  # a bad URL, half-set credentials or a missing site key fail before Ray starts
    check_model(cfg.score.model)  # user errors here, before Ray starts or a run folder is made
    if not pacs:
        listed = check_inputs(cfg.score.input, cfg.score.extensions)
        check_uid_key(cfg.score.uids, cfg.score.uid_key, listed.paths, cfg.score.extensions, cfg.score.uid_key_file)

    if cfg.score.explain_flagged and not load_card(cfg.score.model).positive_class:
        raise ConfigError("score.explain_flagged needs a binary model with a positive class; "
                          "use `medclf explain --target CLASS` for multi-class models")
    from medclf.score.adaptation import check_adapt_config

    check_adapt_config(cfg.score, load_card(cfg.score.model))  # score.adapt=bn on a negative verdict: before Ray
    init_ray(cfg)
    use_shared_root(cfg)
    if cfg.score.output:
        check_shared_storage(cfg.score.output, cfg, "score.output")
    run_id = new_run_id(cfg)
    existed = storage.exists(storage.join(cfg.run.root, run_id))
    run_dir = run_folder(cfg, run_id)
    output = cfg.score.output or storage.join(run_dir, "predictions")
    save_resolved_config(cfg, run_dir, "score")
    try:
        if pacs:
            pacs_run = run_pacs_scoring(cfg, run_id, cfg.score.input, cfg.score.model, output)
            summary = pacs_run.scoring
        else:
            summary = run_scoring(cfg, run_id, cfg.score.input, cfg.score.model, output)
    except (UserError, FileNotFoundError):  # refused (exit 2 or 3): leave no run folder behind
        discard_unused_run_folder(run_dir, existed, "score")
        raise
    print(pacs_run if pacs else summary)
    log_job(cfg, "score", run_id, load_card(cfg.score.model).model_id, dataclasses.asdict(summary))
    if cfg.score.explain_flagged:
        from medclf.report.gradcam import flagged_paths

        card = load_card(cfg.score.model)
        flagged = flagged_paths(output, card.model_id, card.positive_class, run_id)
        heatmaps = cfg.explain.output or storage.join(run_dir, "explanations")
        if flagged:
            index = explain_into(cfg, flagged, cfg.score.model, heatmaps)
            print(f"Grad-CAM for {len(index)} flagged file(s) -> {heatmaps}")
        else:
            print("no file flagged in this run; no heatmaps")
    if summary.failed:
        print(f"{summary.failed} file(s) failed; see the 'error' column in {output}")
    if cfg.score.drift_report:  # right after scoring, in the same job: tonight's rows against the reference
        result = drift_report(cfg, cfg.score.model, output, cfg.drift.output or storage.join(run_dir, "drift"),
                              run_id=run_id)
        if result.flagged:
            from medclf.monitor.drift import DRIFT_EXIT

            return DRIFT_EXIT
    return 1 if (summary.failed and args.fail_on_error) else 0


def cmd_drift(args: argparse.Namespace) -> int:
    from medclf.monitor.drift import DRIFT_EXIT

    cfg = _config_from(args, None, {"score.output": "predictions", "score.model": "model", "drift.output": "output"})
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
    from medclf.report.evaluate import dropped_note
    from medclf.model.artifact import load_card

    cfg = _config_from(args, options={"evaluate.predictions": "predictions", "evaluate.labels": "labels",
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


def cmd_explain(args: argparse.Namespace) -> int:
    from medclf.report.gradcam import flagged_paths
    from medclf.model.artifact import load_card

    cfg = _config_from(args, options={"score.model": "model", "score.input": "input", "explain.output": "output",
                                      "explain.layer": "layer", "explain.target": "target"})
    from medclf.score.preflight import check_inputs, check_model

    check_model(cfg.score.model)
    if not (cfg.score.input or args.flagged):
        raise ConfigError("explain needs files: --input FOLDER/GLOB/MANIFEST, or --flagged PREDICTIONS")
    card = load_card(cfg.score.model)
    if args.flagged:
        if not card.positive_class:
            raise ConfigError(f"--flagged needs a binary model with a positive class; {card.model_id} has none")
        paths = flagged_paths(args.flagged, card.model_id, card.positive_class)
        if not paths:
            print(f"no file in {args.flagged} was flagged {card.positive_class} by {card.model_id}; nothing to explain")
            return 0
    else:
        paths = check_inputs(cfg.score.input, cfg.score.extensions).paths
    init_ray(cfg)
    use_shared_root(cfg)
    run_dir = run_folder(cfg, new_run_id(cfg))
    output = cfg.explain.output or storage.join(run_dir, "explanations")
    save_resolved_config(cfg, run_dir, "explain")
    index = explain_into(cfg, paths, cfg.score.model, output)
    failed = int((index["status"] != "ok").sum())
    print(f"explained {len(index) - failed} file(s), {failed} failed -> {output} (index: explanations.parquet)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    extra = [f"serve.port={args.port}"] if args.port else []
    cfg = _config_from(args, extra, {"serve.model": "model", "serve.host": "host",
                                     "serve.site_profile": "site_profile",
                                     "serve.site_calibration": "site_calibration"})
    from medclf.model.artifact import load_card
    from medclf.score.preflight import check_model

    check_model(cfg.serve.model)  # a missing or bad artifact fails here, before Ray starts
    card = load_card(cfg.serve.model)
    if cfg.serve.site_profile:  # as must a profile of another model, or an altered one
        from medclf.model.adapt import read_profile

        read_profile(cfg.serve.site_profile, card.model_id)
    if cfg.serve.site_calibration:  # and so does a bad or another model's calibration file
        from medclf.model.site_calibration import load as load_site_calibration

        load_site_calibration(cfg.serve.site_calibration, card)
    from medclf.score.auth import serve_token
    from medclf.score.serve import run_server

    serve_token(cfg.serve.token_file, cfg.serve.insecure_no_auth)  # no token: refuse before Ray starts

    init_ray(cfg)
    run_server(cfg, blocking=True)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from medclf.ops.tracking import list_runs, tracking_uri

    cfg = _config_from(args)
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


def cmd_export(args: argparse.Namespace) -> int:
    from medclf.model.export import export_artifact

    storage.check_input_url(args.model)
    doc = export_artifact(args.model, args.output, args.format)
    print(f"exported {doc['model_id']} -> {args.output}: {', '.join(doc['files'])} + contract.json")
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


def explain_into(cfg: Config, paths: list[str], model: str, output: str):
    from medclf.report.gradcam import run_explain

    ec = cfg.explain
    return run_explain(paths, model, output, ec.layer, ec.target, ec.batch_size, ec.num_actors, ec.cpus_per_actor,
                       cfg.score.decode_batch_size, cfg.score.frames, cfg.report.show_paths)


def cmd_demo(args: argparse.Namespace) -> int:
    from medclf.data.phantoms import generate
    from medclf.score.batch import run_scoring
    from medclf.train.driver import run_training

    t0 = time.time()
    cfg = _config_from(args)
    run_id = new_run_id(cfg)
    run_dir = run_folder(cfg, run_id)
    data_dir = os.path.join(run_dir, "data")
    pc = cfg.phantoms
    print(f"[demo] run folder: {run_dir}")
    manifest = generate(data_dir, pc.n_train, pc.n_test, pc.image_size, pc.positive_fraction, tuple(pc.formats),
                        cfg.run.seed)
    print(f"[demo] 1/4 phantoms: {len(manifest)} files ({', '.join(pc.formats)}) in {data_dir}")
    cfg.data.root = data_dir
    save_resolved_config(cfg, run_dir, "demo")
    init_ray(cfg)
    use_shared_root(cfg)
    trained = run_training(cfg, run_dir)
    print(f"[demo] 2/4 trained {trained.card.model_id}, threshold {trained.card.threshold:.3f} -> {trained.model_path}")
    predictions = os.path.join(run_dir, "predictions")
    summary = run_scoring(cfg, run_id, os.path.join(data_dir, cfg.data.test_split), trained.model_path, predictions)
    print(f"[demo] 3/4 {summary}")
    # the manifest labels every phantom; only the test split was scored
    cfg.evaluate.allow_unscored = True
    report = evaluation_for(cfg, predictions, os.path.join(run_dir, "report"), trained.card.classes,
                            trained.card.positive_class, os.path.join(data_dir, "manifest.parquet"),
                            trained.card.model_id)
    print(f"[demo] 4/4 report -> {report.output}")
    print()
    print(f"Test split ({report.n_evaluated} files scored, {report.n_failed} failed), model {trained.card.model_id}:")
    print_metrics(report.metrics)
    print(f"\ndone in {time.time() - t0:.0f}s; everything is under {run_dir}")
    return 0


COMMANDS = {
    "phantoms": (phantoms_parser, cmd_phantoms),
    "train": (train_parser, cmd_train),
    "score": (score_parser, cmd_score),
    "drift": (drift_parser, cmd_drift),
    "evaluate": (evaluate_parser, cmd_evaluate),
    "explain": (explain_parser, cmd_explain),
    "export": (export_parser, cmd_export),
    "serve": (serve_parser, cmd_serve),
    "runs": (runs_parser, cmd_runs),
    "demo": (demo_parser, cmd_demo),
    "calibrate": (calibrate_parser, cmd_calibrate),
    "prior": (prior_parser, cmd_prior),
}


def run_command(name: str, argv: list[str], prog: Optional[str] = None) -> int:
    """Parse `argv` for subcommand `name` and run it; user errors print one clear message, exit 2; an
    output another run is writing (LeaseHeld) exits 3, so a scheduler can tell "try later" apart."""
    make_parser, command = COMMANDS[name]
    args = make_parser(prog or f"medclf {name}").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logs.set_verbose(getattr(args, "verbose", False))
    logs.quiet_python_warnings()
    if getattr(args, "verbose", False):
        # Only our own loggers: botocore at DEBUG logs request headers (session token, access key id).
        logging.getLogger("medclf").setLevel(logging.DEBUG)
    from medclf.score.lease import LEASE_HELD_EXIT, LeaseHeld

    try:
        return command(args)
    except LeaseHeld as exc:  # a UserError, but its own status: "try later", not "fix your input"
        print(f"error: {exc}", file=sys.stderr)
        return LEASE_HELD_EXIT
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        from medclf import __version__

        print(f"medclf {__version__}")
        return 0
    parser = argparse.ArgumentParser(prog="medclf", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=commands_help())
    parser.add_argument("-V", "--version", action="store_true", help="print medclf's version and exit")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="what to run (below); `medclf COMMAND --help` for its options")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
    return run_command(argv[0], argv[1:])


def commands_help() -> str:
    """One line per command: the first sentence of its parser's description."""
    lines = ["commands:"]
    for name, (make_parser, _) in COMMANDS.items():
        first = (make_parser(f"medclf {name}").description or "").split(". ")[0].split("; ")[0].rstrip(".")
        lines.append(f"  {name:<10}{first}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
