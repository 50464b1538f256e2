"""The inference stage: a Ray Data actor that holds the model (with a site profile and a site
calibration when given) and turns batches of preprocessed images into prediction rows. Batch scoring
(medclf.score.batch), label-free adaptation's drift check (medclf.score.adaptation) and the online
endpoint (medclf.score.serve) share it, so every path answers alike."""

from __future__ import annotations

import contextlib
import io
import time
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from medclf.data.predictions import EMB_COLUMNS, prediction_schema, prob_column
from medclf.imaging.preprocess import to_model_input
from medclf.imaging.device_decode import decode_on_device
from medclf.imaging.stage import META_KEYS, error_kind, error_text, text_or_none
from medclf.model.networks import class_probabilities, penultimate
from medclf.model.conv_fusion import fuse_conv_activation
from medclf.model.decision import predict_labels
from medclf.model.fold import fold_batchnorm
from medclf.model.records import input_gate
from medclf.model.site_calibration import load as load_site_calibration
from medclf.monitor.ood import score_reason
from medclf.monitor.opened import open_model
from medclf.imaging.stats import STAT_COLUMNS
from medclf.score.costs import ANSWERED_COLUMN, per_row
from medclf.score.precision import autocast_dtype


class Predictor:
    """Ray Data actor: holds the model, turns a batch of tensors into prediction rows."""

    def __init__(self, model_path: str, run_id: str, use_gpu: bool = False, threads: int | None = None,
                 runtime: str = "torch", ood_action: str = "out_of_scope", site_profile: Optional[str] = None,
                 site_calibration: Optional[str] = None, precision: str = "auto", compile_model: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        opened = open_model(model_path, self.device)  # the artifact's files, each read once
        self.model, self.card = opened.model, opened.card
        self.domain = opened.domain  # None: an artifact from before the guard
        self.reference = opened.reference  # None: an artifact from before drift
        self.adaptation_id = None  # the site profile's id (medclf.model.adapt), before the runtime is built
        # The guard's reference features and threshold, and the drift reference, were measured with the
        # training statistics; under a site profile they read the features of the network as trained
        # (a second forward pass), never the adapted one's, which moved away from that reference.
        self.training_network = None
        if site_profile:
            import copy

            from medclf.model.site_profile import adapt_network

            if self.domain is not None or self.reference is not None:
                self.training_network = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            self.adaptation_id = adapt_network(self.model, self.card, site_profile)
        # A site's own temperature and threshold (medclf calibrate) replace the card's; None: the card's.
        self.calibration = load_site_calibration(site_calibration, self.card) if site_calibration else None
        self.threshold = self.calibration.threshold if self.calibration else self.card.threshold
        # This copy only answers: each BatchNorm after a convolution is folded into it (same function to
        # float rounding; Lite0's forward 1.5x faster on a CPU: medclf.model.fold), after the site profile.
        # On a CPU, each ReLU/ReLU6 after a convolution then runs inside it (one oneDNN call, the same result:
        # medclf.model.conv_fusion); ONNX Runtime fuses on its own.
        for network in (self.model, self.training_network):
            if network is not None:
                fold_batchnorm(network)
                if self.device == "cpu" and runtime == "torch" and not (compile_model and network is self.model):
                    # (torch.compile fuses on its own)
                    fuse_conv_activation(network)
        # NHWC lets oneDNN/cuDNN pick faster convolution kernels (ResNet18 on CPU: +24%, same outputs).
        self.model = self.model.to(memory_format=torch.channels_last)
        # score.compile: the network as one graph returning (logits, features), compiled at its first batch
        # (medclf.model.compiled); the site profile's guard network stays eager.
        self.compiled = None
        if compile_model and runtime == "torch":
            from medclf.model.compiled import compiled_network

            self.compiled = compiled_network(self.model, self.card.arch)
        # float16 autocast on a GPU, float32 on a CPU unless the config asks for bfloat16 (medclf.score.precision)
        self.autocast = autocast_dtype(precision, self.device) if runtime == "torch" else None
        self.onnx = _onnx_session(self.model, self.card, threads) if runtime == "onnxruntime" else None
        self.ood_action = ood_action
        self.gate = input_gate(self.card, ood_action)  # the decode task's checks, for the JPEGs decoded here
        self.run_id = run_id
        self.prob_columns = [prob_column(c) for c in self.card.classes]
        self.schema = prediction_schema(self.card.classes)

    def logits_and_features(self, pixels) -> tuple[np.ndarray, np.ndarray]:
        """Logits and penultimate features (the out-of-scope guard's input) of preprocessed one-channel
        images (N, 1, S, S), numpy or a tensor, from one forward pass of whichever runtime the config names."""
        if self.onnx is not None:
            if isinstance(pixels, self.torch.Tensor):
                pixels = pixels.cpu().numpy()
            logits, features = self.onnx.run(None, {"image": np.ascontiguousarray(pixels, np.float32)})
            return logits, features
        return self._forward(self.model, pixels)

    def _forward(self, network, pixels) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
        x = to_model_input(x.to(self.device)).contiguous(memory_format=torch.channels_last)
        cast = torch.autocast(self.device, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            if network is self.model and self.compiled is not None:
                logits, features = self.compiled(x)
            else:
                logits, features = penultimate(network, self.card.arch, x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def __call__(self, batch: dict):
        import pyarrow as pa

        torch = self.torch
        statuses = text_or_none(batch["status"])  # set by the decode task for rows not to be scored
        errors, kinds = text_or_none(batch["error"]), text_or_none(batch["error_kind"])
        n = len(statuses)
        stats = {name: np.asarray(batch[name], np.float64) if name in batch else np.full(n, np.nan)
                 for name in STAT_COLUMNS}
        t_decode = np.asarray(batch.get("t_decode", np.zeros(n)), np.float64)
        decoded = {}  # row -> (1, S, S) tensor on this actor's device: the JPEGs it decoded itself
        if "encoded" in batch and any(len(b) for b in batch["encoded"]):
            started = time.perf_counter()
            decoded, rows = self._decode_jpegs(batch, statuses, errors, kinds, stats)
            t_decode = t_decode.copy()  # (a read-only view of the batch)
            t_decode[rows] += per_row(time.perf_counter() - started, len(rows))
        ok = np.array([s is None for s in statuses], bool)
        probs = np.full((n, len(self.card.classes)), np.nan, np.float32)
        ood_scores = np.full(n, np.nan)
        emb = np.full((n, len(EMB_COLUMNS)), np.nan)
        started = time.perf_counter()
        if ok.any():
            pixels = batch["pixels"][ok] if not ok.all() else batch["pixels"]
            if decoded:  # this batch's own decodes join the others on the device, no trip to the host
                pixels = torch.tensor(pixels, device=self.device)  # a copy: the batch may be read-only shared memory
                for j, i in enumerate(np.flatnonzero(ok)):
                    if i in decoded:
                        pixels[j] = decoded[i]
            logits, features = self.logits_and_features(pixels)
            probs[ok] = (self.calibration.probabilities(logits) if self.calibration else
                         class_probabilities(torch.from_numpy(logits), self.card.temperature).numpy())
            guard_logits = logits
            if self.training_network is not None:  # under a site profile (see __init__)
                guard_logits, features = self._forward(self.training_network, pixels)
            if self.domain is not None:
                ood_scores[ok] = self.domain.scores(features, guard_logits)
            if self.reference is not None:  # the embedding summary drift compares (medclf.monitor.drift)
                emb[ok] = self.reference.project(features)
        # Out of scope by the feature score with ood.action=out_of_scope (the default): probabilities kept
        # (audit), no label, the reason in `error`. `flag` writes ood_score and leaves the answer standing.
        beyond = ok & (ood_scores > self.domain.record.threshold) if self.domain is not None else np.zeros(n, bool)
        if self.ood_action != "out_of_scope":
            beyond[:] = False
        for i in np.flatnonzero(beyond):
            statuses[i] = "out_of_scope"
            errors[i] = f"{batch['path'][i]}: {score_reason(ood_scores[i], self.domain.record)}"
        ok &= ~beyond
        labels = predict_labels(probs, self.card.classes, self.card.positive_index, self.threshold)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        out = {k: v for k, v in batch.items() if k != "pixels"}  # `first_row` rides along for the sink
        for key in ("checksum", *META_KEYS):
            out[key] = text_or_none(batch[key])
        out["error"], out["error_kind"] = errors, kinds
        out["ood_score"] = _nullable(ood_scores)
        for name in STAT_COLUMNS:
            out[name] = _nullable(stats[name])
        for k, name in enumerate(EMB_COLUMNS):
            out[name] = _nullable(emb[:, k])
        out["predicted_label"] = [lab if good else None for lab, good in zip(labels, ok)]
        for j, col in enumerate(self.prob_columns):
            out[col] = probs[:, j]
        out["threshold"] = np.full(n, np.nan if self.threshold is None else self.threshold, np.float64)
        out["calibration_id"] = [self.calibration.calibration_id if self.calibration else None] * n
        out["model_id"] = [self.card.model_id] * n
        out["model_version"] = [self.card.created_at] * n
        out["adaptation_id"] = [self.adaptation_id] * n
        out["run_id"] = [self.run_id] * n
        out["scored_at"] = [now] * n
        out["status"] = ["ok" if good else status for good, status in zip(ok, statuses)]
        out["size"] = np.asarray(batch["size"], np.int64)
        out["path"] = [str(p) for p in batch["path"]]
        frame = np.asarray(batch["frame"], np.int64)
        out["frame"] = pa.array(frame, pa.int32(), mask=frame < 0)
        table = pa.table({name: out[name] for name in self.schema.names}, schema=self.schema)
        table = table.append_column("first_row", pa.array(np.asarray(batch["first_row"], bool)))
        # Stage costs ride along for the sink, which sums them (medclf.score.costs); never written.
        table = table.append_column("t_read", pa.array(np.asarray(batch.get("t_read", np.zeros(n)), np.float64)))
        table = table.append_column("t_decode", pa.array(t_decode))
        table = table.append_column("t_forward", pa.array(per_row(time.perf_counter() - started, n)))
        return table.append_column(ANSWERED_COLUMN, pa.array(np.full(n, time.time())))

    def _decode_jpegs(self, batch: dict, statuses: list, errors: list, kinds: list, stats: dict):
        """Decode the rows whose JPEG bytes the decode task handed over (`score.jpeg_decode`) on this actor's
        device, and fill in what the task would have: status, error, drift statistics
        (medclf.imaging.device_decode). Returns ({row: model input on the device}, the rows decoded)."""
        rows = [i for i, b in enumerate(batch["encoded"]) if len(b)]
        paths = [str(batch["path"][i]) for i in rows]
        judged = decode_on_device([batch["encoded"][i] for i in rows], paths, self.card.preprocess_spec,
                                  self.gate, self.device)
        decoded = {}
        for name in stats:  # written below: a copy (the batch's columns may be read-only shared memory)
            stats[name] = stats[name].copy()
        for i, path, result in zip(rows, paths, judged):
            if result.stats:
                for name, value in result.stats.items():
                    stats[name][i] = value
            if result.error is not None:
                statuses[i], errors[i], kinds[i] = "error", error_text(path, result.error), error_kind(result.error)
            elif result.refused:
                statuses[i], errors[i] = "out_of_scope", f"{path}: {result.refused}"
            else:
                decoded[i] = result.pixels
        return decoded, rows


def _nullable(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values, pa.float64(), mask=np.isnan(values))


def _onnx_session(model, card, threads: int | None):
    """An ONNX Runtime CPU session on the artifact's network (exported in memory, as `medclf export`
    does) with two outputs: logits and the penultimate features the out-of-scope guard scores."""
    import onnxruntime as ort
    import torch

    from medclf.model.export import ONNX_OPSET

    class LogitsAndFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image):
            return penultimate(self.model, card.arch, to_model_input(image))

    size = card.preprocess_spec.image_size
    buffer = io.BytesIO()
    torch.onnx.export(LogitsAndFeatures().eval(), (torch.zeros(2, 1, size, size),), buffer, input_names=["image"],
                      output_names=["logits", "features"], opset_version=ONNX_OPSET, dynamo=False,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
