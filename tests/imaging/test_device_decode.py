"""Issue 35: JPEGs decoded by the inference actor on its device (medclf.imaging.device_decode) give the
model the same input, within DRAFT_TOLERANCE, and the row the same statistics, refusals and errors, as
the decode task's CPU path. On a GPU the device is 'cuda' (nvJPEG); here the same code runs on 'cpu'."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from medclf.config import PreprocessConfig, load_config
from medclf.imaging.appearance import appearance_stats
from medclf.imaging.content import measure_vector, measures
from medclf.imaging.device_decode import actor_jpeg_side, decode_on_device
from medclf.imaging.draft import DRAFT_TOLERANCE
from medclf.imaging.stage import _file_rows, load_images
from medclf.imaging.stats import image_stats, intensity_stats, stats_from
from tests.imaging.test_draft import _film, _jpeg

SPEC = PreprocessConfig(image_size=224, mean=0.5, std=0.25)
GATE = {"modalities": [], "min_size": 0, "content": True}


def _task_row(data: bytes, path: str, gate=GATE) -> dict:
    return next(_file_rows(path, SPEC, None, "middle", None, data=data, gate=gate))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU"))


@pytest.mark.parametrize("where", ["cpu", CUDA])
@pytest.mark.parametrize("size, mode", [(2048, "L"), (2048, "RGB"), (1000, "L"), (300, "L")])
def test_the_device_path_gives_the_task_paths_input_and_statistics(size, mode, where):
    data = _jpeg(_film(size, seed=3), mode)
    task = _task_row(data, "film.jpeg")
    [device] = decode_on_device([data], ["film.jpeg"], SPEC, GATE, where)
    assert task["status"] is None and device.error is None and device.refused is None
    gap = np.abs(device.pixels.cpu().numpy() - task["pixels"]) * SPEC.std  # in [0, 1] grey levels
    assert gap.mean() <= DRAFT_TOLERANCE["mean_abs"] and gap.max() <= DRAFT_TOLERANCE["max_abs"], (gap.mean(), gap.max())
    # decoded at the draft size (2,048 -> 512, 1,000 -> 500, 300 as it is), so sizes match exactly
    for name in ("img_height", "img_width", "img_aspect"):
        assert device.stats[name] == task["stats"][name]
    for name in ("img_mean", "img_sd", "img_p5", "img_p50", "img_p95"):
        assert abs(device.stats[name] - task["stats"][name]) < 0.01, name


def test_the_checks_on_a_tensor_equal_the_checks_on_numpy():
    rng = np.random.default_rng(0)
    images = [_film(400, seed=1).astype(np.float32) / 255, np.zeros((64, 80), np.float32),
              np.full((300, 300), 0.5, np.float32), rng.random((300, 200)).astype(np.float32)]
    for image in images:
        tensor = torch.from_numpy(image)
        np.testing.assert_allclose(list(stats_from(intensity_stats(tensor).numpy(), *image.shape).values()),
                                   list(image_stats(image).values()), rtol=0, atol=1e-6)
        np.testing.assert_allclose(measure_vector(tensor).numpy(), list(measures(image).values()), rtol=0,
                                   atol=1e-6)
        np.testing.assert_allclose(appearance_stats(tensor[:224, :224]).numpy(), appearance_stats(image[:224, :224]),
                                   rtol=1e-9, atol=1e-9)


def test_refusals_and_errors_match_the_task_path():
    blank = _jpeg(np.zeros((600, 600), np.uint8), "L")
    noise = _jpeg(np.random.default_rng(1).integers(0, 256, (600, 600), dtype=np.uint8), "L")
    good = _jpeg(_film(600, seed=2), "L")
    truncated = good[: len(good) // 3]
    paths = ["blank.jpeg", "noise.jpeg", "good.jpeg", "truncated.jpeg"]
    judged = decode_on_device([blank, noise, good, truncated], paths, SPEC, GATE, "cpu")
    tasks = [_task_row(d, p) for d, p in zip([blank, noise, good, truncated], paths)]
    assert tasks[0]["error"] == f"blank.jpeg: {judged[0].refused}" and "all pixels are zero" in judged[0].refused
    assert tasks[1]["error"] == f"noise.jpeg: {judged[1].refused}" and "no image structure" in judged[1].refused
    assert judged[0].pixels is None and judged[1].pixels is None
    assert judged[2].refused is None and judged[2].error is None and judged[2].pixels.shape == (1, 224, 224)
    # the batch call fails on the truncated file; it is then decoded alone on the CPU, which says what is wrong
    assert str(judged[3].error) == tasks[3]["error"] and "corrupt or truncated JPEG" in tasks[3]["error"]
    assert judged[3].stats is None and tasks[3]["status"] == "error"


def test_the_task_hands_over_jpegs_and_decodes_everything_else(tmp_path):
    big, small = _jpeg(_film(1000, seed=4), "L"), _jpeg(_film(200, seed=5), "L")
    png = io.BytesIO()
    Image.fromarray(_film(1000, seed=6)).save(png, "PNG")
    paths = []
    for name, data in (("big.jpeg", big), ("small.jpeg", small), ("film.png", png.getvalue()),
                       ("bad.jpeg", b"\xff\xd8\xff\xe0 not a jpeg")):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    [batch] = list(load_images({"path": np.array(paths)}, SPEC.model_dump(), actor_jpeg=896, gate=GATE))
    handed = [len(b) > 0 for b in batch["encoded"]]
    assert handed == [True, False, False, False]  # >= 896 px a side and a JPEG; a bad header fails here
    assert batch["encoded"][0] == big and not batch["pixels"][0].any() and np.isnan(batch["img_mean"][0])
    assert batch["status"][0] is None and batch["format"][0] == "jpeg" and batch["checksum"][0]
    assert batch["pixels"][1].any() and batch["pixels"][2].any() and batch["status"][3] == "error"
    [plain] = list(load_images({"path": np.array(paths)}, SPEC.model_dump(), gate=GATE))
    assert "encoded" not in plain and plain["pixels"][0].any()
    # the header's checks stay in the task: a film under the model's minimum size is not handed over
    [gated] = list(load_images({"path": np.array(paths[:1])}, SPEC.model_dump(), actor_jpeg=896,
                               gate={**GATE, "min_size": 1200}))
    assert gated["status"][0] == "out_of_scope" and "image too small: 1000x1000" in gated["error"][0]
    assert not len(gated["encoded"][0])


def test_which_jpegs_the_actor_decodes():
    assert actor_jpeg_side("auto", True, 224) == 896  # where draft mode would shrink the film
    assert actor_jpeg_side("auto", False, 224) is None  # CPU actors: the tasks decode
    assert actor_jpeg_side("actor", False, 224) == 0 and actor_jpeg_side("tasks", True, 224) is None
    assert load_config(None, ["score.jpeg_decode=actor"]).score.jpeg_decode == "actor"
    with pytest.raises(Exception, match="jpeg_decode"):
        load_config(None, ["score.jpeg_decode=gpu"])
