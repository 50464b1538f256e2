"""The online endpoint (Ray Serve on 127.0.0.1): the same answers as batch scoring for PNG, JPEG
and DICOM, the batch job's error text for bad input, concurrent requests batched, Grad-CAM on request."""

import base64
import glob
import io
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.model.artifact import load_card, prob_column

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served_model(trained_model, tmp_path_factory):
    """The shared phantom model with a domain record for chest films (CR, DX), as training writes one."""
    from medclf.config import load_config
    from medclf.monitor.ood import add_domain
    from tests.conftest import TINY

    run_dir = os.path.dirname(trained_model.model_path)
    val = pd.read_parquet(os.path.join(run_dir, "splits.parquet")).query("split == 'val'")
    cfg = load_config(None, TINY + ["ood.enabled=true", "data.modalities=[CR, DX]"])
    dest = str(tmp_path_factory.mktemp("served") / "model")
    add_domain(trained_model.model_path, dest, cfg, list(val.path), list(val.label))
    return dest


@pytest.fixture(scope="module")
def endpoint(ray_cluster, served_model, phantom_root):
    from ray import serve

    from medclf.config import load_config
    from medclf.score.serve import run_server

    port = _free_port()
    cfg = load_config(None, [f"serve.port={port}", "serve.cpus_per_replica=0.5", "serve.max_batch_size=16",
                             "serve.batch_wait_timeout_s=0.2"])
    url = run_server(cfg, served_model, blocking=False)
    yield url
    serve.shutdown()


def test_answers_match_batch_scoring_for_png_jpeg_and_dicom(endpoint, served_model, tiny_config, phantom_root,
                                                            tmp_path):
    from pydicom.data import get_testdata_file

    from medclf.data.predictions import read_predictions
    from medclf.score.batch import run_scoring

    card = load_card(served_model)
    pngs = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[:3]
    dicoms = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.dcm")))[:3]
    jpegs = []
    for i, p in enumerate(pngs):  # JPEG copies: a lossy encoding the decoder must treat the same way in both
        jpegs.append(str(tmp_path / f"img{i}.jpg"))
        Image.open(p).convert("L").save(jpegs[-1], quality=90)
    corrupt = str(tmp_path / "corrupt.png")
    open(corrupt, "wb").write(open(pngs[0], "rb").read()[:200])  # a truncated PNG
    ct = str(tmp_path / "ct.dcm")  # a CT slice: out of scope for a chest-film model (its modality)
    open(ct, "wb").write(open(get_testdata_file("CT_small.dcm"), "rb").read())
    files = pngs + dicoms + jpegs + [corrupt, ct]
    manifest = str(tmp_path / "inputs.csv")
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    run_scoring(tiny_config, "vs-serve", manifest, served_model, str(tmp_path / "pred"))
    batch = read_predictions(str(tmp_path / "pred")).set_index("path")

    for path in files:
        status, answer = _post(f"{endpoint}/predict", open(path, "rb").read())
        row = batch.loc[path]
        assert answer["status"] == row["status"], (path, answer)
        if row["status"] == "ok":
            assert status == 200 and answer["label"] == row["predicted_label"]
            assert answer["model_id"] == card.model_id and answer["threshold"] == pytest.approx(card.threshold)
            for c in card.classes:
                assert answer["probabilities"][c] == pytest.approx(float(row[prob_column(c)]), abs=1e-5)
        else:  # the corrupt file and the CT: 422 and the batch job's own text, the file called "upload"
            assert status == 422
            assert answer["error"] == row["error"].replace(path, "upload")
            assert path not in json.dumps(answer)

    # multipart upload of a DICOM gives the same answer as the raw body
    boundary = "medclfboundary"
    data = open(dicoms[0], "rb").read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.dcm\"\r\n"
            f"Content-Type: application/dicom\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, answer = _post(f"{endpoint}/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and answer["label"] == batch.loc[dicoms[0], "predicted_label"]
    assert answer["format"] == "dicom"
    assert batch.loc[ct, "status"] == "out_of_scope"  # the CT was checked above as a 422 with the batch text


def test_concurrent_requests_are_batched(endpoint, phantom_root):
    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[:24]
    before = _get(f"{endpoint}/stats")
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda p: _post(f"{endpoint}/predict", open(p, "rb").read()), files))
    assert all(status == 200 for status, _ in results)
    after = _get(f"{endpoint}/stats")
    assert after["requests"] - before["requests"] == len(files)
    assert after["max_batch"] > 1  # more than one request went through one forward pass
    assert after["batches"] - before["batches"] < len(files)


def test_health_model_card_explain_and_limits(endpoint, served_model, phantom_root):
    card = load_card(served_model)
    assert _get(f"{endpoint}/healthz") == {"status": "ok", "model_id": card.model_id}
    served_card = _get(f"{endpoint}/model")
    assert served_card["model_id"] == card.model_id and served_card["classes"] == card.classes

    png = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[0]
    status, answer = _post(f"{endpoint}/predict?explain=1", open(png, "rb").read())
    assert status == 200
    picture = Image.open(io.BytesIO(base64.b64decode(answer["gradcam_png"])))
    assert picture.format == "PNG" and picture.width > picture.height  # image and overlay side by side
    assert np.asarray(picture).std() > 0

    status, answer = _post(f"{endpoint}/predict", b"not an image at all")
    assert status == 422 and answer["status"] == "error" and answer["error"].startswith("upload")
    # over serve.max_file_mb (64): refused on its Content-Length, before the body is sent
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(endpoint)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(65 * 2**20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "serve.max_file_mb" in json.loads(response.read())["error"]
    conn.close()
