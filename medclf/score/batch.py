"""Batch scoring with Ray Data: list -> read+decode+preprocess (tasks) -> model (actor pool) -> Parquet.

Reading/decoding runs in Ray tasks separate from the inference actors, so the two overlap and
each scales on its own. A file that cannot be read or decoded becomes a row with
`status = "error"` and its message; a file that holds no image (a DICOM report) a row with
`status = "skipped"` and the reason; an image the model was not trained for (medclf.monitor.ood: another
DICOM modality, too small, or an `ood_score` above the model's threshold) a row with
`status = "out_of_scope"` and the reason; the run goes on. One row per image: a single-image file
gives one row (`frame` null), a multi-frame DICOM one row per frame (`score.frames`).
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from medclf import storage
from medclf.ops import faults
from medclf.config import Config
from medclf.errors import UserError
from medclf.imaging.device_decode import actor_jpeg_side
from medclf.imaging.stage import ALREADY_SCORED, TRANSIENT, find_inputs, images_dataset, scored_key
from medclf.score.actors import gpus_per_actor, resolve_num_actors
from medclf.score.costs import cost_line
from medclf.score.adaptation import check_adapt_config, prepare_adaptation
from medclf.score.predictor import Predictor  # noqa: F401 (callers import it from here too)
from medclf.model.decision import predict_labels  # noqa: F401 (likewise)
from medclf.score.lease import Lease, verify
from medclf.data.predictions import prediction_schema, predictions_dataset
from medclf.model.artifact import load_card
from medclf.model.site_calibration import load as load_site_calibration
from medclf.model.records import input_gate
from medclf.imaging.scope import reason_kind
from medclf.imaging.confine import default_roots, resolved_roots
from medclf.imaging.privacy import uid_key
from medclf.score.preflight import check_uid_key, no_inputs_message

log = logging.getLogger(__name__)

def scored_keys(output: str, model_id: str, fault: Optional[faults.Fault] = None) -> np.ndarray:
    """Sorted keys of every image this model already has a committed row for in `output`.

    Rows of transient errors do not count: those files are tried again.

    An output folder with no committed file yet (empty, or holding only what a killed run left
    under hidden names) has no keys.
    """
    if not storage.exists(output):
        return np.zeros(0, np.uint64)
    import pyarrow.compute as pc

    dataset = predictions_dataset(output)
    faults.check(fault, "listing")
    settled = pc.field("error_kind").is_null() | (pc.field("error_kind") != TRANSIENT)
    # `frame` is always there: predictions_dataset adds the standard columns (null in older files)
    table = dataset.to_table(columns=["path", "checksum", "frame"],
                             filter=(pc.field("model_id") == model_id) & settled)
    keys = [scored_key(p, c or "", f) for p, c, f in zip(table.column("path").to_pylist(),
                                                         table.column("checksum").to_pylist(),
                                                         table.column("frame").to_pylist())]
    return np.unique(np.array(keys, np.uint64))


def clean_stale_temps(output: str) -> list[str]:
    """Delete the hidden temporary files that killed runs left in `output`.

    Only called while holding the output's lease, when no other run can be writing: every
    temporary file there belongs to a run that died before publishing it.
    """
    if storage.is_remote(output) or not storage.exists(output):
        return []  # on S3 an object is published in one PUT: a killed run leaves nothing behind
    ours = f"._lease.json.{os.getpid()}-"  # this run's own lease renewal, possibly in flight
    stale = []
    for folder, _, names in os.walk(output):
        # A run killed while renewing its lease leaves `._lease.json.<its pid>-*.tmp`: stale too.
        stale += [os.path.join(folder, n) for n in names
                  if n.startswith(".") and n.endswith(".tmp") and not n.startswith(ours)]
    for path in stale:
        storage.remove(path)
    return stale


@dataclass
class ScoreSummary:
    """Counts of images (rows), each computed from the rows themselves: seen = scored + skipped +
    failed + out_of_scope, where skipped = already scored + not an image."""

    output: str
    seen: int
    skipped: int
    scored: int
    failed: int
    seconds: float
    files: list
    already_scored: int = 0
    not_images: int = 0
    out_of_scope: int = 0
    files_listed: int = 0
    filtered: int = 0
    out_of_scope_reasons: dict = field(default_factory=dict)
    """Out-of-scope rows of this run per reason (medclf.imaging.scope.REASONS keys)."""
    stage_seconds: dict = field(default_factory=dict)  # medclf.score.costs.STAGES -> busy seconds
    startup_s: Optional[float] = None
    """Wall seconds from the run's start to its first answer (medclf.score.costs); None: nothing answered."""
    adaptation: str = ""
    """What score.adapt decided, and why (medclf.score.adaptation.AdaptDecision)."""
    profile_path: Optional[str] = None
    """The site profile this run scored with (None: training statistics); Grad-CAM of its flags uses it."""

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.failed + self.out_of_scope
        return done / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (
            f"files listed {self.files_listed} ({self.filtered} left out by score.extensions); images seen "
            f"{self.seen}: scored {self.scored}, skipped {self.skipped} ({self.already_scored} already scored, "
            f"{self.not_images} not an image), failed {self.failed}, out of scope {self.out_of_scope}"
            f"{_by_reason(self.out_of_scope_reasons)}; "
            f"{self.seconds:.1f}s, {self.images_per_s:.1f} images/s -> {self.output}"
            + (f"\n{self.adaptation}" if self.adaptation else "")
        ) + (f"\n{cost_line(self.stage_seconds, self.seen, self.startup_s)}" if self.stage_seconds else "")


def run_scoring(cfg: Config, run_id: str, input_path: str, model_path: str, output: str,
                rescore: Optional[bool] = None) -> ScoreSummary:
    """Score `input_path` into the predictions dataset `output`, incrementally.

    Output layout: `<output>/run_date=YYYY-MM-DD/part-<run id>-<lease token>-<task>.parquet`, each
    file committed atomically and exactly once (medclf.score.sink). The run holds the output's lease
    (medclf.score.lease) from before it reads the output until its last commit: a second run refuses
    with LeaseHeld. Unless `rescore`, images this model already scored (same path, bytes and
    frame; transient errors excepted) are skipped, so re-running a night, or resuming a killed
    one, adds exactly the missing rows.
    """
    from medclf.score.sink import CommitPerFileDatasink

    start = time.time()
    sc = cfg.score
    rescore = sc.rescore if rescore is None else rescore
    storage.check_input_url(input_path)  # the inputs' kind and the model are checked before any work
    card = load_card(model_path)  # fail fast on a bad artifact, before any Ray work
    if sc.site_calibration:  # a bad or another model's calibration file fails here too
        load_site_calibration(sc.site_calibration, card)
    if card.domain is None:
        log.warning("model %s has no domain record (trained before the out-of-scope guard): no ood_score, and "
                    "no modality or size check; retrain it to get them", card.model_id)
    check_adapt_config(sc, card)
    if sc.compile:
        from medclf.model.compiled import check_compilable

        check_compilable(card.arch)
    listed = time.perf_counter()
    inputs = find_inputs(input_path, sc.extensions)
    list_seconds = time.perf_counter() - listed
    roots = resolved_roots(sc.allowed_roots or default_roots(input_path))  # where manifest entries may point
    paths = inputs.paths
    if not paths:
        raise UserError(no_inputs_message(input_path, sc.extensions))
    check_uid_key(sc.uids, sc.uid_key, paths, sc.extensions, sc.uid_key_file)  # a key only where a DICOM UID can be met
    log.debug("score settings: extensions %s, frames %s, max_file_mb %s, decode_retries %d", sc.extensions,
              sc.frames, sc.max_file_mb, sc.decode_retries)
    fault = faults.from_env()
    with Lease(output, run_id, sc.lease_seconds) as held:  # LeaseHeld: another run writes here
        faults.check(fault, "leased")
        stale = clean_stale_temps(output)
        if stale:
            log.warning("removed %d temporary file(s) left by a killed run in %s", len(stale), output)
        skip = np.zeros(0, np.uint64) if rescore else scored_keys(output, card.model_id, fault)
        log.info("scoring %d files from %s with model %s (%d images already scored)", len(paths), input_path,
                 card.model_id, len(skip))
        adaptation = prepare_adaptation(cfg, card, model_path, paths, output, run_id, input_path)
        log.debug("%s", adaptation)  # the summary line prints it
        run_date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        sink = CommitPerFileDatasink(storage.join(output, f"run_date={run_date}"), run_id,
                                     prediction_schema(card.classes), sc.rows_per_file, output, held.token, fault)
        _scoring_dataset(cfg, paths, card, model_path, run_id, skip, roots,
                         adaptation.profile_path).write_datasink(sink)
        statuses, files = dict(sink.statuses), [path for path, _ in sink.committed]
        if sink.first_rows < len(paths):
            lost = _write_lost_files(paths, output, card, run_id, run_date, sc.decode_retries, held.token)
            files += lost.files
            statuses["error"] = statuses.get("error", 0) + lost.rows
        faults.check(fault, "before_release")
        held.check()
    counts = {k: statuses.get(k, 0) for k in ("ok", "error", "skipped", "out_of_scope", ALREADY_SCORED)}
    return ScoreSummary(output, sum(statuses.values()), counts[ALREADY_SCORED] + counts["skipped"], counts["ok"],
                        counts["error"], time.time() - start, files, already_scored=counts[ALREADY_SCORED],
                        not_images=counts["skipped"], out_of_scope=counts["out_of_scope"],
                        files_listed=len(paths), filtered=inputs.filtered,
                        out_of_scope_reasons=_reason_counts(output, run_id) if counts["out_of_scope"] else {},
                        stage_seconds={"list": list_seconds, **sink.stage_seconds},
                        startup_s=None if sink.first_answer is None else max(0.0, sink.first_answer - start),
                        adaptation=str(adaptation),
                        profile_path=adaptation.profile_path)


def _by_reason(reasons: dict) -> str:
    return f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""


def _reason_counts(output: str, run_id: str) -> dict:
    """This run's out_of_scope rows per reason, read back from what was committed."""
    import pyarrow.compute as pc

    table = predictions_dataset(output).to_table(
        columns=["error"], filter=(pc.field("run_id") == run_id) & (pc.field("status") == "out_of_scope"))
    kinds = [reason_kind(e) for e in table.column("error").to_pylist()]
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def _scoring_dataset(cfg: Config, paths: list[str], card, model_path: str, run_id: str, skip: np.ndarray,
                     roots: Optional[tuple] = None, site_profile: Optional[str] = None):
    """paths -> decode tasks -> inference actor pool: the Ray Dataset of prediction rows."""
    import ray.data

    sc = cfg.score
    ds = images_dataset(paths, card.preprocess_spec, sc.decode_batch_size, skip if len(skip) else None,
                        sc.frames, sc.max_file_mb, sc.decode_retries, (sc.uids, uid_key(sc.uid_key, sc.uid_key_file)),
                        input_gate(card, cfg.ood.action), roots=roots,
                        actor_jpeg=actor_jpeg_side(sc.jpeg_decode, sc.use_gpu, card.preprocess_spec.image_size))
    threads = sc.torch_threads or max(1, int(sc.cpus_per_actor))
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": model_path, "run_id": run_id, "use_gpu": sc.use_gpu,
                               "threads": threads, "runtime": sc.runtime,
                               "ood_action": cfg.ood.action, "site_profile": site_profile,
                               "site_calibration": sc.site_calibration, "precision": sc.precision,
                               "compile_model": sc.compile},
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=resolve_num_actors(sc.num_actors, sc.use_gpu, sc.cpus_per_actor, ray.cluster_resources(),
                                    sc.actors_per_gpu)),
        num_cpus=sc.cpus_per_actor,
        num_gpus=gpus_per_actor(sc.use_gpu, sc.actors_per_gpu),
    )
    # Decoding outpaces inference; without a cap Ray Data lets the decoded backlog grow toward its
    # default budget (a share of the whole object store), so memory would grow with the archive.
    options = ds.context.execution_options  # this dataset's own context, not the process-wide one
    options.resource_limits = options.resource_limits.copy(object_store_memory=sc.buffer_mb * 1024**2)
    # A decode task that failed all its retries loses its files, not the night: they become error rows below.
    ds.context.max_errored_blocks = -1
    return ds


@dataclass
class _Lost:
    files: list
    rows: int


def _write_lost_files(paths: list[str], output: str, card, run_id: str, run_date: str, retries: int,
                      lease_token: str) -> _Lost:
    """Error rows for listed files that got no row at all (their decode task died `retries` + 1 times).

    Transient: a crash or out-of-memory is not known to be the content's fault, so the next night
    tries those files again. Committed like the sink's files: under the lease, exclusively."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    done = predictions_dataset(output).to_table(columns=["path"], filter=pc.field("model_id") == card.model_id)
    lost = sorted(set(paths) - set(done.column("path").to_pylist()))
    if not lost:
        return _Lost([], 0)
    log.error("%d file(s) got no row: their decode task failed %d times; recording them as errors", len(lost),
              retries + 1)
    schema = prediction_schema(card.classes)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    values = {"path": lost, "status": ["error"] * len(lost), "model_id": [card.model_id] * len(lost),
              "model_version": [card.created_at] * len(lost), "run_id": [run_id] * len(lost),
              "scored_at": [now] * len(lost), "size": [-1] * len(lost), "error_kind": [TRANSIENT] * len(lost),
              "error": [f"{p}: the task decoding this file failed {retries + 1} times (worker crashed or ran out of "
                        "memory)" for p in lost]}
    table = pa.table({f.name: pa.array(values.get(f.name, [None] * len(lost)), f.type) for f in schema}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    final = storage.join(output, f"run_date={run_date}", f"part-{run_id}-{lease_token[:8]}-lost.parquet")
    verify(output, lease_token)  # a run that lost the output commits nothing
    storage.create_exclusive(final, buf.getvalue())
    return _Lost([final], len(lost))
