"""Commands that make models: phantoms, train, and the end-to-end demo."""

from __future__ import annotations

import argparse
import os
import time

from medclf import storage
from medclf.cli.parsers import config_from
from medclf.cli.reports import evaluation_for, print_metrics
from medclf.config import Config, load_config
from medclf.ops.runs import (
    init_ray,
    new_run_id,
    run_folder,
    save_resolved_config,
    use_shared_root,
)


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
    cfg = config_from(args, extra, {"data.root": "data", "data.manifest": "manifest"})
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


def cmd_demo(args: argparse.Namespace) -> int:
    from medclf.data.phantoms import generate
    from medclf.score.batch import run_scoring
    from medclf.train.driver import run_training

    t0 = time.time()
    cfg = config_from(args)
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
