"""The one preprocessing function: an image already at the model's size skips torch (medclf.imaging.preprocess),
and gets, to the bit, what the torch path gives it."""

import numpy as np
import pytest
import torch

from medclf.config import PreprocessConfig
from medclf.imaging.preprocess import preprocess_gray, preprocess_tensor


@pytest.mark.parametrize("mean, std", [(0.5, 0.25), (0.485, 0.229), (0.449, 0.226)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_numpy_intensity_step_equals_the_torch_one(mean, std, dtype):
    spec = PreprocessConfig(image_size=64, mean=mean, std=std)
    image = (np.random.default_rng(0).random((64, 64)) * 1.2 - 0.1).astype(dtype)  # also outside [0, 1]
    got = preprocess_gray(image, spec)
    want = preprocess_tensor(torch.from_numpy(image.astype(np.float32)), spec).numpy()
    assert got.dtype == np.float32 and got.shape == (1, 64, 64)
    assert np.array_equal(got, want)
    assert image.min() < 0  # the caller's image is left as it was
    resized = preprocess_gray(np.ascontiguousarray(np.repeat(image, 2, axis=0)), spec)  # 128 x 64: torch resizes
    assert resized.shape == (1, 64, 64) and resized.dtype == np.float32
