"""medclf.data.augment.acquisition_shift: the zoom shifts are one batched call that gives every image the
same result as zooming it alone with its own darkest value as the fill."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kind", [k for k in ACQUISITION_SHIFTS if k.startswith("zoom")])
def test_batched_zoom_matches_each_image_zoomed_alone_with_its_own_fill(kind):
    gen = torch.Generator().manual_seed(0)
    # Different offsets per image, so a shared fill value would show at the borders of zoom-outs.
    x = torch.rand((5, 1, 48, 48), generator=gen) + torch.arange(5.0).view(5, 1, 1, 1) * 3 - 6
    scale = float(kind.split()[1])
    alone = torch.stack([TF.affine(im, angle=0.0, translate=[0, 0], scale=scale, shear=[0.0], fill=float(im.min()))
                         for im in x])
    batched = acquisition_shift(x, kind, mean=0.5, std=0.25)
    assert batched.shape == x.shape
    assert torch.allclose(batched, alone, atol=1e-5)
    assert not torch.allclose(batched, x)  # the shift changed the images
