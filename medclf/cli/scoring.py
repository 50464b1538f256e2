"""Commands that run a model on images: score (batch), explain (Grad-CAM) and serve (online)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from medclf import storage
from medclf.cli.parsers import config_from
from medclf.cli.reports import drift_report
from medclf.config import Config, ConfigError
from medclf.errors import UserError
from medclf.imaging.confine import check_locations
from medclf.ops.runs import (
    check_shared_storage,
    discard_unused_run_folder,
    init_ray,
    new_run_id,
    run_folder,
    save_resolved_config,
    use_shared_root,
)
from medclf.ops.tracking import log_job


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
    cfg = config_from(args, extra, {"score.input": "input", "score.model": "model", "score.output": "output",
                                     "score.site_calibration": "site_calibration"})
    from medclf.imaging.dicomweb import is_dicomweb
    from medclf.score.preflight import check_inputs, check_model, check_uid_key

    pacs = is_dicomweb(cfg.score.input)  # a PACS over DICOMweb (docs/pacs.md)
    check_locations(None if pacs else cfg.score.input, cfg.score.output)  # schemes first (medclf.imaging.confine)
    if pacs:
        from medclf.score.pacs import check_pacs_input, run_pacs_scoring

        check_pacs_input(cfg)  # a bad URL, half-set credentials or a missing site key fail before Ray starts
    card = check_model(cfg.score.model)  # user errors here, before Ray starts or a run folder is made
    if not pacs:
        listed = check_inputs(cfg.score.input, cfg.score.extensions)
        check_uid_key(cfg.score.uids, cfg.score.uid_key, listed.paths, cfg.score.extensions, cfg.score.uid_key_file)

    if cfg.score.explain_flagged and not card.positive_class:
        raise ConfigError("score.explain_flagged needs a binary model with a positive class; "
                          "use `medclf explain --target CLASS` for multi-class models")
    from medclf.score.adaptation import check_adapt_config

    check_adapt_config(cfg.score, card)  # score.adapt=bn on a negative verdict: before Ray
    init_ray(cfg, state_api=False)  # no dashboard: scoring never trains (medclf.ops.runs.local_ray_options)
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
    log_job(cfg, "score", run_id, card.model_id, dataclasses.asdict(summary))
    if cfg.score.explain_flagged:
        from medclf.report.gradcam import flagged_paths

        flagged = flagged_paths(output, card.model_id, card.positive_class, run_id)
        heatmaps = cfg.explain.output or storage.join(run_dir, "explanations")
        if flagged:
            index = explain_into(cfg, flagged, cfg.score.model, heatmaps, summary.profile_path)  # scoring's statistics
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


def cmd_explain(args: argparse.Namespace) -> int:
    from medclf.report.gradcam import flagged_paths

    cfg = config_from(args, options={"score.model": "model", "score.input": "input", "explain.output": "output",
                                      "explain.layer": "layer", "explain.target": "target",
                                      "explain.site_profile": "site_profile"})
    from medclf.score.preflight import check_inputs, check_model

    card = check_model(cfg.score.model)
    if not (cfg.score.input or args.flagged):
        raise ConfigError("explain needs files: --input FOLDER/GLOB/MANIFEST, or --flagged PREDICTIONS")
    if args.flagged:
        if not card.positive_class:
            raise ConfigError(f"--flagged needs a binary model with a positive class; {card.model_id} has none")
        paths = flagged_paths(args.flagged, card.model_id, card.positive_class)
        if not paths:
            print(f"no file in {args.flagged} was flagged {card.positive_class} by {card.model_id}; nothing to explain")
            return 0
    else:
        paths = check_inputs(cfg.score.input, cfg.score.extensions).paths
    init_ray(cfg, state_api=False)  # no dashboard: Grad-CAM never trains
    use_shared_root(cfg)
    run_dir = run_folder(cfg, new_run_id(cfg))
    output = cfg.explain.output or storage.join(run_dir, "explanations")
    save_resolved_config(cfg, run_dir, "explain")
    index = explain_into(cfg, paths, cfg.score.model, output)
    failed = int((index["status"] != "ok").sum())
    print(f"explained {len(index) - failed} file(s), {failed} failed -> {output} (index: explanations.parquet)")
    return 0


def explain_into(cfg: Config, paths: list[str], model: str, output: str, site_profile: Optional[str] = None):
    """Grad-CAM of `paths`; `site_profile` (default: explain.site_profile) as scoring used it."""
    from medclf.report.gradcam import run_explain

    ec = cfg.explain
    return run_explain(paths, model, output, ec.layer, ec.target, ec.batch_size, ec.num_actors, ec.cpus_per_actor,
                       cfg.score.decode_batch_size, cfg.score.frames, cfg.report.show_paths,
                       site_profile or ec.site_profile)


def cmd_serve(args: argparse.Namespace) -> int:
    extra = [f"serve.port={args.port}"] if args.port else []
    cfg = config_from(args, extra, {"serve.model": "model", "serve.host": "host",
                                     "serve.site_profile": "site_profile",
                                     "serve.site_calibration": "site_calibration"})
    from medclf.score.preflight import check_model

    card = check_model(cfg.serve.model)  # a missing or bad artifact fails here, before Ray starts
    if cfg.serve.site_profile:  # as must a profile of another model, or an altered one
        from medclf.model.site_profile import profile_for

        profile_for(card, cfg.serve.site_profile)
    if cfg.serve.site_calibration:  # and so does a bad or another model's calibration file
        from medclf.model.site_calibration import load as load_site_calibration

        load_site_calibration(cfg.serve.site_calibration, card)
    from medclf.score.auth import serve_token
    from medclf.score.serve import run_server

    serve_token(cfg.serve.token_file, cfg.serve.insecure_no_auth)  # no token: refuse before Ray starts

    init_ray(cfg)
    run_server(cfg, blocking=True)
    return 0
