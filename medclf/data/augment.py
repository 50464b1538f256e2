"""Image perturbations on preprocessed (N, 1, S, S) tensors.

`augment_batch`: random training augmentation (never applied at evaluation).
`acquisition_shift`: fixed, deterministic shifts that imitate another site's images (exposure,
gamma, contrast and blur, field of view). Training can choose its decision threshold on validation
images under these shifts (train.threshold_validation=shifted), and the pneumonia benchmark reports
validation metrics under each, because an operating point tuned on the clean validation split of
the training archive does not transfer to a new archive.
"""

from __future__ import annotations

import math

import torch

# name -> what it does; the order is the order of reports
ACQUISITION_SHIFTS = {
    "gamma 0.7": "brighter mid-tones (gamma 0.7 on the [0, 1] image)",
    "gamma 1.4": "darker mid-tones (gamma 1.4)",
    "low contrast + blur": "contrast x0.75 around the mean, then Gaussian blur sigma 1 px",
    "zoom 0.9": "field of view 11% wider (image shrunk to 90%)",
    "zoom 1.1": "field of view 9% narrower (image enlarged to 110%)",
}


def augment_batch(x: torch.Tensor, aug: dict, mean: float, std: float, gen: torch.Generator) -> torch.Tensor:
    """Random affine + acquisition-like intensity changes on a batch of preprocessed (N,1,S,S) images.

    One batched affine_grid/grid_sample instead of a per-image loop; intensity terms act on the
    [0, 1] image (undoing the normalisation) so gamma means what it means on a radiograph.
    """
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    n = x.shape[0]
    u = torch.rand((n, 10), generator=gen)
    angle = (u[:, 0] * 2 - 1) * math.radians(aug["rotate_deg"])
    lo, hi = aug["scale"]
    zoom = lo + u[:, 1] * (hi - lo)
    shift = (u[:, 2:4] * 2 - 1) * aug["translate"] * 2  # grid units: the side is 2 long
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if aug["hflip"] else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    floor = x.amin(dim=(1, 2, 3), keepdim=True)  # fill uncovered corners with the image's darkest value
    x = F.grid_sample(x - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + floor

    v = (x * std + mean).clamp(0.0, 1.0)
    g_lo, g_hi = aug["gamma"]
    if g_hi > g_lo or g_lo != 1.0:
        gamma = torch.exp(math.log(g_lo) + u[:, 5] * (math.log(g_hi) - math.log(g_lo))).view(n, 1, 1, 1)
        v = v.clamp_min(1e-6) ** gamma
    contrast = (1 + (u[:, 6] * 2 - 1) * aug["contrast"]).view(n, 1, 1, 1)
    img_mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = (v - img_mean) * contrast + img_mean
    x = (v - mean) / std + ((u[:, 7] * 2 - 1) * aug["brightness"]).view(n, 1, 1, 1)
    if aug["blur_prob"] > 0:
        blurred = u[:, 8] < aug["blur_prob"]
        if blurred.any():
            sigma = float(0.5 + torch.rand((), generator=gen) * 1.0)
            x[blurred] = TF.gaussian_blur(x[blurred], kernel_size=[5, 5], sigma=[sigma, sigma])
    if aug["noise_std"] > 0:
        x = x + torch.randn(x.shape, generator=gen) * (u[:, 9] * aug["noise_std"]).view(n, 1, 1, 1)
    return x


def acquisition_shift(x: torch.Tensor, kind: str, mean: float, std: float) -> torch.Tensor:
    """One of ACQUISITION_SHIFTS (or "as is") applied to normalised images."""
    from torchvision.transforms.v2 import functional as TF

    if kind == "as is":
        return x
    if kind not in ACQUISITION_SHIFTS:
        raise ValueError(f"unknown shift '{kind}'; known: {', '.join(ACQUISITION_SHIFTS)}")
    if kind.startswith("zoom"):
        # One call for the whole batch (per-image calls cost ~40x more); each image's uncovered border
        # takes its own darkest value: shift to 0, zoom with fill 0 (nearest: values are copied), shift back.
        floor = x.amin(dim=(1, 2, 3), keepdim=True)
        zoomed = TF.affine(x - floor, angle=0.0, translate=[0, 0], scale=float(kind.split()[1]), shear=[0.0], fill=0.0)
        return zoomed + floor
    v = (x * std + mean).clamp(0, 1)
    if kind.startswith("gamma"):
        v = v.clamp_min(1e-6) ** float(kind.split()[1])
    else:  # low contrast + blur
        m = v.mean(dim=(1, 2, 3), keepdim=True)
        v = TF.gaussian_blur((v - m) * 0.75 + m, kernel_size=[5, 5], sigma=[1.0, 1.0])
    return (v - mean) / std
