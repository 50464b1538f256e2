"""The online endpoint (Ray Serve on 127.0.0.1): the same answers as batch scoring for PNG, JPEG
and DICOM, the batch job's error text for bad input, concurrent requests batched, Grad-CAM on request."""

import base64
import glob
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.model.artifact import load_card
from medclf.data.predictions import prob_column

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAN_MIB_PER_S = 120  # 1 Gbit/s: the fastest a hospital client uploads

AUTH = {"Authorization": "Bearer " + os.environ["MEDCLF_SERVE_TOKEN"]}  # set by tests/conftest.py


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={**AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str, headers: dict | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=AUTH if headers is None else headers),
                                timeout=60) as response:
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

    serve.shutdown()  # a Serve an earlier test left running would keep its own proxy port (a no-op otherwise)
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
    tiny_config.score.allowed_roots = [str(tmp_path), phantom_root]  # the manifest names files in two folders
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
    assert _get(f"{endpoint}/healthz", headers={}) == {"status": "ok"}  # the probe: no token, no disclosure
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
    conn.putheader("Authorization", AUTH["Authorization"])
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "serve.max_file_mb" in json.loads(response.read())["error"]
    conn.close()


# --- security (issue 34; docs/security.md) ---

CANARY = "canary-7f3a-do-not-echo"


def _raw(endpoint: str, method: str, path: str, headers: dict) -> tuple[int, bytes]:
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(endpoint)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request(method, path, body=b"x" if method == "POST" else None, headers=headers)
    response = conn.getresponse()
    out = response.status, response.read()
    conn.close()
    return out


def test_every_route_but_the_exact_probe_needs_the_token(endpoint, served_model):
    from medclf.score.auth import UNAUTHORIZED_BODY

    paths = ["/predict", "/model", "/stats", "/nope", "/xhealthz", "/healthz/", "/a/healthz", f"/{CANARY}"]
    for headers in ({}, {"Authorization": f"Bearer {CANARY}"}, {"Authorization": AUTH["Authorization"][7:]},
                    {"Authorization": "Basic " + AUTH["Authorization"][7:]}):
        for method in ("GET", "POST"):
            for path in paths:
                status, body = _raw(endpoint, method, path, {**headers, "X-Probe": CANARY})
                assert status == 401, (method, path, headers)
                assert json.loads(body) == UNAUTHORIZED_BODY and CANARY.encode() not in body
    status, body = _raw(endpoint, "GET", "/healthz", {})
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _ = _raw(endpoint, "GET", "/nope", AUTH)
    assert status == 404  # authenticated: the real answer


def test_model_route_serves_the_public_card_only(endpoint, served_model, phantom_root):
    card = load_card(served_model)
    served = _get(f"{endpoint}/model")
    assert served["model_id"] == card.model_id and served["classes"] == card.classes
    assert not {"config", "provenance", "failure_modes", "domain", "reference", "files"} & set(served)
    text = json.dumps(served)
    assert phantom_root not in text and os.environ["MEDCLF_UID_KEY"] not in text
    assert os.environ["MEDCLF_SERVE_TOKEN"] not in text


def test_the_endpoint_answers_under_a_site_profile_as_its_predictor_does_and_says_which(endpoint, served_model,
                                                                                       phantom_root, tmp_path):
    """`serve.site_profile` through HTTP: the answer is the profile's Predictor's to 1e-5 (which
    tests/score/test_adapt_scoring.py ties to the scored rows), carries the profile's id, and differs
    from the unadapted endpoint's answer for the same film."""
    from urllib.parse import urlsplit

    import pyarrow as pa
    from ray import serve

    from medclf.config import load_config
    from medclf.imaging.stage import list_inputs, load_images
    from medclf.score.adaptation import prepare_adaptation
    from medclf.score.batch import Predictor
    from medclf.score.serve import build_app

    card = load_card(served_model)
    paths = list_inputs(os.path.join(phantom_root, "test"), [".png"])
    made = prepare_adaptation(load_config(None, ["score.adapt=bn", "score.adapt_sample=40"]), card, served_model,
                              paths, str(tmp_path), "serve-profile")
    assert made.adapted and made.profile_path
    cfg = load_config(None, ["serve.cpus_per_replica=0.25", "serve.route_prefix=/adapted",
                             f"serve.site_profile={made.profile_path}"])
    serve.run(build_app(cfg, served_model), name="medclf-adapted", route_prefix="/adapted")
    try:
        port = urlsplit(endpoint).port
        local = Predictor(served_model, "serve", threads=1, site_profile=made.profile_path)
        rows = pa.concat_tables([local(b) for b in load_images({"path": np.array(paths[:16], object)},
                                                               card.preprocess, rows_per_batch=16)]).to_pandas()
        # The guard and the drift embedding read the network as trained, whose features their references
        # hold: the same ood_score and embedding as without the profile, while the answers move.
        unadapted = Predictor(served_model, "serve", threads=1)
        before = pa.concat_tables([unadapted(b) for b in load_images({"path": np.array(paths[:16], object)},
                                                                     card.preprocess, rows_per_batch=16)]).to_pandas()
        assert rows.ood_score.notna().all() and rows.emb_pc1.notna().all()  # the model has both references
        np.testing.assert_allclose(rows.ood_score, before.ood_score, atol=1e-5)
        np.testing.assert_allclose(rows[["emb_pc1", "emb_pc2"]], before[["emb_pc1", "emb_pc2"]], atol=1e-4)
        assert list(rows.status) == list(before.status)
        assert np.abs(rows[prob_column(card.classes[0])] - before[prob_column(card.classes[0])]).max() > 1e-4
        ok = rows[rows.status == "ok"].head(3)  # films the guard lets through (the rest answer 422 either way)
        assert len(ok) == 3, rows[["status", "error"]].to_string()
        rows = ok
        moved = 0.0
        for path, row in zip(rows.path, rows.itertuples()):
            body = open(path, "rb").read()
            status, answer = _post(f"http://127.0.0.1:{port}/adapted/predict", body)
            assert status == 200 and answer["adaptation_id"] == made.profile_id, answer
            for c in card.classes:
                assert answer["probabilities"][c] == pytest.approx(float(getattr(row, prob_column(c))), abs=1e-5)
            _, plain = _post(f"{endpoint}/predict", body)
            assert plain.get("adaptation_id") is None
            moved = max(moved, abs(plain["probabilities"][card.classes[0]] - answer["probabilities"][card.classes[0]]))
        assert moved > 1e-4  # the profile is what differs between the two endpoints
    finally:
        serve.delete("medclf-adapted")


def test_chunked_body_over_the_limit_is_cut_and_the_replica_stays_small(endpoint, served_model):
    """A chunked body (no Content-Length) 32 x the limit: 413, and the replica's RSS never grows by the body."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    import psutil
    from ray import serve

    from medclf.config import load_config
    from medclf.score.serve import build_app

    cfg = load_config(None, ["serve.cpus_per_replica=0.25", "serve.max_file_mb=4", "serve.route_prefix=/small"])
    serve.run(build_app(cfg, served_model), name="medclf-small", route_prefix="/small")
    try:
        port = urlsplit(endpoint).port  # the proxy the endpoint fixture started; this app under /small
        stats = json.loads(_raw(f"http://127.0.0.1:{port}", "GET", "/small/stats", AUTH)[1])
        replica = psutil.Process(stats["pid"])
        assert _raw(f"http://127.0.0.1:{port}", "GET", "/small/healthz", {})[0] == 200
        for body_mb in (32, 512):  # the first over-limit request warms the replica's heap up; the second is measured
            base = replica.memory_info().rss
            peak = [base]
            done = threading.Event()

            def watch():
                while not done.is_set():
                    peak[0] = max(peak[0], replica.memory_info().rss)
                    done.wait(0.02)

            watcher = threading.Thread(target=watch)
            watcher.start()
            chunk = b"\0" * 2**20
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.putrequest("POST", "/small/predict")
            conn.putheader("Transfer-Encoding", "chunked")  # no Content-Length to decide on
            conn.putheader("Authorization", AUTH["Authorization"])
            conn.endheaders()
            try:
                for sent_mb in range(body_mb):
                    # At a 1 Gbit/s LAN's rate, not loopback's: Serve's proxy reads the client with no
                    # backpressure and a replica's pull takes the whole backlog, so at loopback rate the
                    # peak measures how late the replica pulled on 2 busy cores, not the handler.
                    time.sleep(max(0.0, started + sent_mb / LAN_MIB_PER_S - time.monotonic()))
                    conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may stop reading once it has refused
            response = conn.getresponse()
            answer = json.loads(response.read())
            conn.close()
            done.set()
            watcher.join()
            growth_mb = (peak[0] - base) / 2**20
            print(f"replica RSS {base / 2**20:.0f} MiB, peak growth {growth_mb:.1f} MiB, {body_mb} MiB chunked body")
            assert response.status == 413 and "serve.max_file_mb" in answer["error"]
        # A body read whole before the check adds >= 512 MiB; streamed and cut at 4 MiB it stays far below.
        # Not just 4 MiB: each pull from the proxy brings every message queued since the last one (measured
        # at loopback rate: 53 MiB alone; 180 and 326 MiB in full suites on 2 busy cores). Half the body
        # still tells the two apart.
        assert growth_mb < body_mb / 2
    finally:
        serve.delete("medclf-small")
