"""Online scoring with Ray Serve: one answer for one study, now.

A viewer or a PACS router POSTs one image (PNG, JPEG or DICOM bytes; a raw body or a multipart
form) to `/predict` and gets JSON back. The bytes go through batch scoring's own row function
(`medclf.imaging.stage`: the per-file limits, decoding, preprocessing and the checks that make a row
`error`, `skipped` or `out_of_scope`) and its `Predictor` (temperature, threshold, runtime), so an
answer is the predictions row `jobs/score.py` writes for the same file. Requests that arrive
together share one forward pass (`@serve.batch`).

    medclf serve --model runs/<id>/model [--port 8000]
    curl -H "Authorization: Bearer $MEDCLF_SERVE_TOKEN" --data-binary @scan.dcm http://127.0.0.1:8000/predict
    curl -H ... --data-binary @scan.dcm 'http://127.0.0.1:8000/predict?explain=1'   # + a Grad-CAM PNG (base64)
    curl -H ... http://127.0.0.1:8000/model                                         # the public model card

Security (medclf.score.auth, docs/security.md): every route but `GET /healthz` needs
`Authorization: Bearer $MEDCLF_SERVE_TOKEN`; /model is the public card (medclf.model.card.public_card);
bodies are read as a stream and cut at serve.max_file_mb (medclf.score.upload).

Answers: 200 with the label and calibrated probabilities; 413 for a body over `serve.max_file_mb`;
422 when the file cannot be decoded, holds no image, or is out of scope, with the batch job's error
text (the reason; `?explain=1` gives no heatmap for it, `explain` says it was refused); 503 for transient failures (retry). Responses and logs never carry the file's name or any
DICOM tag that identifies a patient: error texts call the file "upload".
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import math
import os
from typing import Optional

import numpy as np
from ray import serve

from medclf.config import Config, ServeConfig
from medclf.imaging.stage import _file_rows, _rows_to_batch
from medclf.data.predictions import prob_column
from medclf.model.card import public_card
from medclf.model.records import input_gate
from medclf.score.auth import UNAUTHORIZED_BODY, authorized, is_liveness, serve_token
from medclf.score.predictor import Predictor
from medclf.score.upload import TooLarge, read_limited

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

    def __init__(self, model_path: str, config: dict, ood_action: str = "out_of_scope"):
        self.cfg = ServeConfig.model_validate(config)
        # Read here, on the replica's node (env or mounted file): the token never travels in deploy args.
        self.token = serve_token(self.cfg.token_file, self.cfg.insecure_no_auth)
        threads = self.cfg.threads or max(1, int(self.cfg.cpus_per_replica))
        self.predictor = Predictor(model_path, "serve", self.cfg.use_gpu, threads, self.cfg.runtime, ood_action,
                                   site_profile=self.cfg.site_profile, site_calibration=self.cfg.site_calibration,
                                   precision=self.cfg.precision)
        self.card = self.predictor.card
        self.spec = self.card.preprocess_spec
        self.gate = input_gate(self.card, ood_action)  # the checks batch scoring's decode stage makes
        self.max_bytes = int(self.cfg.max_file_mb * 2**20)
        self.predict_rows.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_rows.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.url.path
        if is_liveness(request.method, path, self.cfg.route_prefix):
            return JSONResponse({"status": "ok"})  # unauthenticated: discloses nothing
        if not authorized(request.headers.get("authorization"), self.token):
            return JSONResponse(UNAUTHORIZED_BODY, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        prefix = self.cfg.route_prefix.rstrip("/")
        route = path[len(prefix):] if prefix and path.startswith(prefix) else path  # exact: "/xmodel" is not "/model"
        if request.method == "GET" and route == "/model":
            return JSONResponse(public_card(self.card))
        if request.method == "GET" and route == "/stats":
            sizes = self.batch_sizes
            return JSONResponse({"batches": len(sizes), "requests": int(sum(sizes)), "max_batch": max(sizes, default=0),
                                 "pid": os.getpid()})  # operators (authenticated) watch the replica's memory
        if request.method == "POST" and route == "/predict":
            return await self.predict(request)
        return JSONResponse({"error": "not found: use POST /predict, GET /healthz, GET /model"}, status_code=404)

    async def predict(self, request):
        from starlette.responses import JSONResponse

        try:
            body = await read_limited(request, self.max_bytes)
        except TooLarge as exc:
            return JSONResponse(self._too_large(exc.size, exc.declared), status_code=413)
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
                else:  # no heatmap of a decision the model did not make (out of scope, error)
                    answer["gradcam_png"] = None
                    answer["explain"] = f"refused: no explanation for a {answer['status']} input"
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
        for extra in ("ood_score", "adaptation_id", "calibration_id"):  # columns the predictions carry
            if extra in row:
                out[extra] = _json_value(row[extra])
        return out

    def http_status(self, answer: dict) -> int:
        if answer["status"] == "ok":
            return 200
        if answer.get("error_kind") == "transient":
            return 503
        return NOT_OK_STATUS.get(answer["status"], 422)

    def _too_large(self, size: int, declared: bool) -> dict:
        what = f"{size} bytes (Content-Length)" if declared else "the body"
        return {"status": "error", "error_kind": "permanent", "model_id": self.card.model_id,
                "error": f"{UPLOAD_NAME}: {what} is over the {self.cfg.max_file_mb:g} MB limit (serve.max_file_mb)"}

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
    serve_token(sc.token_file, sc.insecure_no_auth)  # no token and not insecure: refuse before deploying
    options = {
        "ray_actor_options": {"num_cpus": sc.cpus_per_replica, "num_gpus": 1 if sc.use_gpu else 0},
        "max_ongoing_requests": sc.max_ongoing_requests,  # x max_file_mb x 2 <= serve.memory_budget_mb
    }
    if sc.max_replicas > sc.min_replicas:
        options["autoscaling_config"] = {"min_replicas": sc.min_replicas, "max_replicas": sc.max_replicas,
                                         "target_ongoing_requests": sc.target_ongoing_requests}
    else:
        options["num_replicas"] = sc.max_replicas
    deployment = serve.deployment(Classifier, name="medclf").options(**options)
    return deployment.bind(model_path, sc.model_dump(), cfg.ood.action)


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
