"""Pixel array -> model input tensor. The ONE preprocessing function.

Training, scoring and Grad-CAM all call `preprocess`, with the spec stored in the model
artifact, so what the model saw in training is what it sees in production.

Grayscale scans are replicated to 3 channels rather than adapting the first convolution:
every torchvision backbone and every ImageNet weight file then works unchanged, and the cost
(a 3x larger first activation) is small next to the rest of the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medclf.config import PreprocessConfig
from medclf.imaging.arrays import clip

if TYPE_CHECKING:
    import torch

CHANNELS = 3


def preprocess_gray(image: np.ndarray, spec: PreprocessConfig) -> np.ndarray:
    """HxW float image in [0, 1] (from `medclf.imaging.decode`) -> float32 (1, S, S): resized, normalised.

    This is the form pipelines store and ship (3x smaller); `to_model_input` makes it 3-channel.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.shape == (spec.image_size, spec.image_size):
        # Already the model's size: the intensity step alone, in numpy (the same float32 arithmetic), so a
        # decode task of such images never imports torch (a second of a fresh worker's start, on 2 cores).
        return _intensity(image, spec)[None]
    import torch

    return preprocess_tensor(torch.from_numpy(image), spec).numpy()


def preprocess_tensor(image: torch.Tensor, spec: PreprocessConfig) -> torch.Tensor:
    """`preprocess_gray` on a float32 HxW tensor, on whatever device it is (the inference actor's GPU when
    it decodes JPEGs itself: medclf.imaging.device_decode) -> (1, S, S) on that device."""
    import torch.nn.functional as F

    x = image[None, None]
    size = spec.image_size
    if x.shape[-2:] != (size, size):
        # antialias: downscaling a 2000 px radiograph without it aliases fine texture.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _intensity(x, spec)[0]


def _intensity(x, spec: PreprocessConfig):
    """The intensity step, on numpy or on a tensor (medclf.imaging.arrays): clip to [0, 1], normalise."""
    return (clip(x, 0.0, 1.0) - spec.mean) / spec.std


def to_model_input(gray: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) -> (N, 3, S, S): replicate the channel (a view, no copy)."""
    return gray.expand(-1, CHANNELS, -1, -1)


def preprocess(image: np.ndarray, spec: PreprocessConfig) -> np.ndarray:
    """HxW float image in [0, 1] -> the model's input, float32 (3, S, S)."""
    import torch

    gray = torch.from_numpy(preprocess_gray(image, spec))[None]
    return to_model_input(gray)[0].numpy().copy()


def denormalize(tensor: np.ndarray, spec: PreprocessConfig) -> np.ndarray:
    """Inverse of the intensity step, for pictures: (3, S, S) or (S, S) -> (S, S) in [0, 1]."""
    arr = tensor[0] if tensor.ndim == 3 else tensor
    return np.clip(arr * spec.std + spec.mean, 0.0, 1.0)
