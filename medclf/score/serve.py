"""Online scoring with Ray Serve: one answer for one study, now.

A viewer or a PACS router POSTs one image (PNG, JPEG or DICOM bytes; a raw body or a multipart
form) to `/predict` and gets JSON back. The bytes go through batch scoring's own row function
(`medclf.imaging.stage`: the per-file limits, decoding, preprocessing and the checks that make a row
`error`, `skipped` or `out_of_scope`) and its `Predictor` (temperature, threshold, runtime), so an
answer is the predictions row `jobs/score.py` writes for the same file. Requests that arrive
together share one forward pass (`@serve.batch`).

    medclf serve --model runs/<id>/model [--port 8000]
    curl --data-binary @scan.dcm http://127.0.0.1:8000/predict
    curl --data-binary @scan.dcm 'http://127.0.0.1:8000/predict?explain=1'   # + a Grad-CAM PNG (base64)
    curl http://127.0.0.1:8000/model                                         # the model card

Answers: 200 with the label and calibrated probabilities; 413 for a body over `serve.max_file_mb`;
422 when the file cannot be decoded, holds no image, or is out of scope, with the batch job's error
text; 503 for transient failures (retry). Responses and logs never carry the file's name or any
DICOM tag that identifies a patient: error texts call the file "upload".
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.parser
import math
from typing import Optional

import numpy as np
from ray import serve

from medclf.config import Config, ServeConfig
from medclf.imaging.stage import _file_rows, _rows_to_batch
from medclf.model.artifact import prob_column
from medclf.monitor.ood import input_gate
from medclf.score.batch import Predictor

UPLOAD_NAME = "upload"  # what error texts call the request's file (its own name may carry a patient's)
NOT_OK_STATUS = {"error": 422, "skipped": 422, "out_of_scope": 422}


def _json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def body_from_multipart(body: bytes, content_type: str) -> bytes:
    """The first file part of a multipart/form-data body (the standard library parses MIME)."""
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    for part in message.walk() if message.is_multipart() else []:
        if part.get_content_maintype() != "multipart":
            return part.get_payload(decode=True) or b""
    raise ValueError("multipart body without a part")


class Classifier:
    """The Serve deployment: the model, the decode stage and the batcher of one replica."""

    def __init__(self, model_path: str, config: dict):
        self.cfg = ServeConfig.model_validate(config)
        threads = self.cfg.threads or max(1, int(self.cfg.cpus_per_replica))
        self.predictor = Predictor(model_path, "serve", self.cfg.use_gpu, threads, self.cfg.runtime,
                                   site_calibration=self.cfg.site_calibration)
        self.card = self.predictor.card
        self.spec = self.card.preprocess_spec
        self.gate = input_gate(self.card)  # the modality / size checks batch scoring's decode stage makes
        self.max_bytes = int(self.cfg.max_file_mb * 2**20)
        self.predict_rows.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_rows.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and route == "healthz":
            return JSONResponse({"status": "ok", "model_id": self.card.model_id})
        if request.method == "GET" and route == "model":
            return JSONResponse(dataclasses.asdict(self.card))
        if request.method == "GET" and route == "stats":
            sizes = self.batch_sizes
            return JSONResponse({"batches": len(sizes), "requests": int(sum(sizes)), "max_batch": max(sizes, default=0)})
        if request.method == "POST" and route == "predict":
            return await self.predict(request)
        return JSONResponse({"error": "not found: use POST /predict, GET /healthz, GET /model"}, status_code=404)

    async def predict(self, request):
        from starlette.responses import JSONResponse

        length = int(request.headers.get("content-length") or 0)
        if length > self.max_bytes:  # refused before a byte of the body is read
            return JSONResponse(self._too_large(length), status_code=413)
        body = await request.body()
        if len(body) > self.max_bytes:
            return JSONResponse(self._too_large(len(body)), status_code=413)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/"):
            try:
                body = body_from_multipart(body, content_type)
            except ValueError as exc:
                return JSONResponse({"status": "error", "error": f"{UPLOAD_NAME}: {exc}"}, status_code=400)
        rows = await asyncio.to_thread(self.rows, body)
        answers = await asyncio.gather(*(self.predict_rows(row) for row in rows))
        explain = request.query_params.get("explain", "0") not in ("0", "", "false")
        if explain:
            for row, answer in zip(rows, answers):
                if answer["status"] == "ok":
                    answer["gradcam_png"] = await asyncio.to_thread(self.gradcam_png, row, answer)
        if len(answers) == 1:
            answer = answers[0]
            return JSONResponse(answer, status_code=self.http_status(answer))
        ok = [a for a in answers if a["status"] == "ok"]
        top = {"status": "ok" if ok else answers[0]["status"], "model_id": self.card.model_id, "frames": answers}
        return JSONResponse(top, status_code=200 if ok else self.http_status(answers[0]))

    def rows(self, body: bytes) -> list[dict]:
        """The request's images, as batch scoring's decode stage makes them (limits, errors, checks)."""
        return list(_file_rows(UPLOAD_NAME, self.spec, None, self.cfg.frames, self.max_bytes, ("drop", None),
                               gate=self.gate, data=body))

    @serve.batch
    async def predict_rows(self, rows: list[dict]) -> list[dict]:
        """Called with one row; Serve gathers concurrent calls into `rows` and runs them as one batch."""
        self.batch_sizes.append(len(rows))
        table = self.predictor(_rows_to_batch(rows, self.spec.image_size))
        return [self.answer(r) for r in table.to_pylist()]

    def answer(self, row: dict) -> dict:
        ok = row["status"] == "ok"
        out = {
            "status": row["status"],
            "label": row["predicted_label"],
            "probabilities": {c: _json_value(row[prob_column(c)]) for c in self.card.classes} if ok else None,
            "threshold": _json_value(row["threshold"]),
            "positive_class": self.card.positive_class,
            "model_id": row["model_id"],
            "model_version": row["model_version"],
            "frame": row["frame"],
            "format": row["format"],
            "modality": row["modality"],
            "checksum": row["checksum"],
            "error": row["error"],
            "error_kind": row["error_kind"],
        }
        for extra in ("ood_score", "calibration_id"):  # columns the predictions carry when the model records them
            if extra in row:
                out[extra] = _json_value(row[extra])
        return out

    def http_status(self, answer: dict) -> int:
        if answer["status"] == "ok":
            return 200
        if answer.get("error_kind") == "transient":
            return 503
        return NOT_OK_STATUS.get(answer["status"], 422)

    def _too_large(self, size: int) -> dict:
        return {"status": "error", "error_kind": "permanent", "model_id": self.card.model_id,
                "error": f"{UPLOAD_NAME}: {size} bytes is over the {self.cfg.max_file_mb:g} MB limit (serve.max_file_mb)"}

    def gradcam_png(self, row: dict, answer: dict) -> str:
        """Grad-CAM of the predicted class over the image, as a base64 PNG."""
        import torch

        from medclf.report.gradcam import default_layer, grad_cam, overlay_png
        from medclf.imaging.preprocess import denormalize, to_model_input

        model = self.predictor.model
        x = to_model_input(torch.from_numpy(row["pixels"][None]).to(self.predictor.device))
        target = [self.card.classes.index(answer["label"])]
        heat, _, _ = grad_cam(model, x.float(), default_layer(self.card.arch), target, self.card.temperature)
        caption = f"{answer['label']} p={max(answer['probabilities'].values()):.2f}"
        png = overlay_png(denormalize(row["pixels"][0], self.spec), heat[0], caption)
        return base64.b64encode(png).decode()


def build_app(cfg: Config, model_path: Optional[str] = None):
    """The Serve application for `cfg.serve` (bind it with serve.run, or return it from a builder)."""
    sc = cfg.serve
    model_path = model_path or sc.model
    if not model_path:
        from medclf.config import ConfigError

        raise ConfigError("serve needs a model (--model or serve.model)")
    options = {
        "ray_actor_options": {"num_cpus": sc.cpus_per_replica, "num_gpus": 1 if sc.use_gpu else 0},
        "max_ongoing_requests": max(4 * sc.max_batch_size, 32),
    }
    if sc.max_replicas > sc.min_replicas:
        options["autoscaling_config"] = {"min_replicas": sc.min_replicas, "max_replicas": sc.max_replicas,
                                         "target_ongoing_requests": sc.target_ongoing_requests}
    else:
        options["num_replicas"] = sc.max_replicas
    deployment = serve.deployment(Classifier, name="medclf").options(**options)
    return deployment.bind(model_path, sc.model_dump())


def app_builder(args: dict):
    """For Serve config files and KubeRay's RayService: `import_path: medclf.score.serve:app_builder`,
    `args: {config: configs/x.yaml, model: s3://..., set: ["serve.max_replicas=4"]}`."""
    from medclf.config import load_config

    cfg = load_config(args.get("config"), list(args.get("set", [])))
    return build_app(cfg, args.get("model"))


def run_server(cfg: Config, model_path: Optional[str] = None, blocking: bool = True) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy; returns the base URL."""
    sc = cfg.serve
    serve.start(http_options={"host": sc.host, "port": sc.port})
    app = build_app(cfg, model_path)
    url = f"http://{sc.host}:{sc.port}{sc.route_prefix.rstrip('/')}"
    print(f"[medclf] serving {model_path or sc.model} at {url}/predict", flush=True)
    serve.run(app, name="medclf", route_prefix=sc.route_prefix, blocking=blocking)
    return url
