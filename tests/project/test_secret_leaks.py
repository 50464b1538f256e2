"""Issue 34, item 1: a planted site key reaches no file that a training, a scoring or a serve run writes.

The key is planted the worst way a site could: written inline in the config file (with
run.allow_inline_secret, which only tests set). It is then looked for, byte for byte, in every file
under the runs' root (run configs, MLflow's params and artifacts, model.json, MODEL_CARD.md,
predictions, reports), in everything the endpoint answers, and in the Ray session's logs. The key
must have been used (the DICOM's UIDs are hashed with it), so "not found" is not "never read".
"""

import json
import os
import shutil
import urllib.request
import uuid

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]


def _files_holding(root: str, needle: bytes) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
    return found


def test_planted_uid_key_is_in_no_file_log_or_answer(ray_cluster, phantom_root, tmp_path, capfd):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from ray import serve

    from medclf.cli import run_command
    from medclf.config import load_config
    from medclf.data.predictions import read_predictions
    from medclf.imaging.privacy import protect_uid
    from medclf.score.serve import build_app
    from tests.conftest import TINY

    key = f"planted-{uuid.uuid4().hex}"
    config = tmp_path / "site.yaml"
    cfg = load_config(None, TINY + [f"data.root={phantom_root}", "tracking.enabled=true"]).model_dump(mode="json")
    cfg["run"]["allow_inline_secret"] = True
    cfg["score"].update(uid_key=key, uids="hash")
    cfg["train"].update(num_workers=1, cpus_per_worker=0.5)  # one Ray Train worker: this is about files, not a model
    config.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"

    assert run_command("train", ["--config", str(config), "--run-root", str(runs), "--run-id", "t"]) == 0
    model = str(runs / "t" / "model")
    inputs = tmp_path / "inputs"
    shutil.copytree(os.path.join(phantom_root, "test", "POSITIVE"), inputs)
    dicom = get_testdata_file("CT_small.dcm")
    shutil.copy(dicom, inputs / "ct.dcm")
    assert run_command("score", ["--config", str(config), "--run-root", str(runs), "--run-id", "s",
                                 "--input", str(inputs), "--model", model]) == 0

    # the key was used: the DICOM's study UID is hashed with it
    rows = read_predictions(str(runs / "s" / "predictions"))
    raw_uid = str(dcmread(dicom).StudyInstanceUID)
    uid_columns = [c for c in rows.columns if c.endswith("_uid")]
    assert uid_columns
    ct = rows[rows.path.str.endswith("ct.dcm")].iloc[0]
    assert protect_uid(raw_uid, "hash", key) in set(ct[uid_columns].astype(str))

    answers = []
    port_cfg = load_config(config, ["serve.cpus_per_replica=0.25", "serve.route_prefix=/leak"])
    from tests.score.test_serve import _free_port

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})  # no-op when Serve already runs
    serve.run(build_app(port_cfg, model), name="medclf-leak", route_prefix="/leak")
    try:
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
        auth = {"Authorization": "Bearer " + os.environ["MEDCLF_SERVE_TOKEN"]}
        for method, path, body in (("GET", "/leak/model", None), ("GET", "/leak/stats", None),
                                   ("GET", "/leak/healthz", None), ("POST", "/leak/predict", open(dicom, "rb").read())):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=auth)
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answers.append(response.read())
            except urllib.error.HTTPError as exc:
                answers.append(exc.read())
    finally:
        serve.shutdown()  # the proxy too: the next test's endpoint starts Serve on a port of its own

    written = [os.path.join(d, n) for d, _, names in os.walk(runs) for n in names]
    assert any(p.endswith("score_config.yaml") for p in written) and any(p.endswith("model.json") for p in written)
    assert any(os.sep + "mlruns" + os.sep in p for p in written)  # MLflow's params and artifacts are searched too
    assert _files_holding(str(runs), key.encode()) == []
    assert all(key.encode() not in a for a in answers) and len(answers) == 4
    assert json.loads(answers[0])["model_id"]  # /model did answer
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    assert _files_holding(os.path.join(session, "logs"), key.encode()) == []
    out, err = capfd.readouterr()
    assert key not in out and key not in err
    saved = yaml.safe_load((runs / "s" / "score_config.yaml").read_text())
    assert saved["score"]["uid_key"] == "**********"  # the redaction, where the key would have been
