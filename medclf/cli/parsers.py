"""The argument parser of each command, and how a command's options become its config (config_from)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from medclf.config import IMAGE_EXTENSIONS, Config, load_config

# medclf/cli/parsers.py -> the project root (where configs/ sits beside medclf/)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                              "demo.yaml")


def add_common(p: argparse.ArgumentParser) -> None:
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


def add_extensions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extensions", nargs="+", metavar="SUFFIX",
                   help="file suffixes to take from a folder or glob, e.g. --extensions .jpg .jpeg .png .dcm; the "
                        "entry 'dicom' also takes DICOM files without a suffix (score.extensions)")


def config_from(args: argparse.Namespace, extra: Optional[list[str]] = None,
                 options: Optional[dict[str, str]] = None) -> Config:
    """The config file, then --set overrides and `extra` (parsed as YAML), then the command's own
    options `{config key: argument name}`, taken as the strings they are (a path with '#' or '~'
    is a path, not YAML)."""
    options = {"run.id": "run_id", "run.root": "run_root", **(options or {})}
    values = {key: getattr(args, name) for key, name in options.items() if getattr(args, name, None)}
    if getattr(args, "extensions", None):  # a list, not a string: passed as an override's YAML
        extra = list(extra or []) + [f"score.extensions={json.dumps(args.extensions)}"]
    return load_config(args.config, list(args.overrides) + (extra or []), values)


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
    add_common(p)
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
    add_common(p)
    p.add_argument("--input", help="folder, glob, s3:// prefix, manifest of files, or dicomweb://host/path?query "
                   "(a PACS: docs/pacs.md) to score (score.input)")
    p.add_argument("--model", help="model artifact folder, local or s3:// (score.model)")
    p.add_argument("--output", help="predictions folder (score.output); default <run folder>/predictions")
    add_extensions(p)
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
    add_common(p)
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
    add_common(p)
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
    add_common(p)
    p.add_argument("--model", help="model artifact folder, local or s3:// (score.model)")
    p.add_argument("--input", help="folder, glob, s3:// prefix or manifest of files to explain (score.input)")
    add_extensions(p)
    p.add_argument("--flagged", metavar="PREDICTIONS",
                   help="instead of --input: the files this model flagged positive in a predictions folder")
    p.add_argument("--output", help="heatmaps folder (explain.output); default <run folder>/explanations")
    p.add_argument("--layer", help="layer to explain, e.g. layer4 (explain.layer); default per architecture")
    p.add_argument("--target", help="class to explain, or 'predicted' (explain.target)")
    p.add_argument("--site-profile", help="the site profile (.npz) a scoring run adapted with, so the maps explain "
                                          "its answers (explain.site_profile)")
    return p


def serve_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Online endpoint (Ray Serve): POST /predict with an image, GET /healthz, GET /model.")
    add_common(p)
    p.add_argument("--model", help="model artifact folder, local or s3:// (serve.model)")
    p.add_argument("--host", help="address to listen on (serve.host); default 127.0.0.1")
    p.add_argument("--port", type=int, help="port (serve.port); default 8000")
    p.add_argument("--site-profile", help="site profile (.npz) of this model to answer with (serve.site_profile)")
    p.add_argument("--site-calibration", help="site calibration file from `medclf calibrate` (serve.site_calibration)")
    return p


def runs_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="List the tracked runs (MLflow) with their key figures, newest first.")
    add_common(p)
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
    p.add_argument("--site-profile", help="bake this site profile's BatchNorm statistics (medclf score's "
                                          "adaptation, a .npz of this model) into the exported files")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (medclf's own loggers) and Ray's own detail (Ray Data plans and progress, "
                        "Ray Train reports)")
    return p


def calibrate_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from medclf.model.site_fit import (
        MAP_CHOICES,
        MIN_FILMS,
        MIN_PER_CLASS,
        THRESHOLD_RULES,
    )

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
    p.add_argument("--extensions", nargs="+", default=list(IMAGE_EXTENSIONS),
                   help="image files to take from a folder (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (medclf's own loggers)")
    return p


def ensemble_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Make one model artifact that averages the calibrated probabilities of trained members. "
                               "Its threshold, metrics, out-of-scope domain and drift reference are fitted on the "
                               "labelled films; it scores, serves, exports and explains like one model "
                               "(docs/ensembles.md).")
    p.add_argument("--members", nargs="+", required=True, metavar="MODEL",
                   help="member artifact folders (local or s3://), at least 2, sharing classes and preprocessing")
    p.add_argument("--labelled", required=True,
                   help="labelled films: a folder of class subfolders, or a manifest (.parquet/.csv with path and "
                        "label); not the members' training images")
    p.add_argument("--out", required=True, help="folder (local or s3://) for the ensemble artifact")
    p.add_argument("--config", default=None,
                   help="YAML config whose `ood` and `data` (modalities, views...) sections set the out-of-scope "
                        "guard; default: built-in defaults with the first member's data.modalities")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ood.quantile=0.99 (repeatable)")
    p.add_argument("--threshold-rule", choices=("youden", "target_sensitivity", "argmax"), default=None,
                   help="how the threshold is chosen on the labelled films; default: the members' own rule, "
                        "refused when they differ")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="with target_sensitivity: the sensitivity to reach (default: the members')")
    p.add_argument("--extensions", nargs="+", default=list(IMAGE_EXTENSIONS),
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
    add_common(p)
    return p
