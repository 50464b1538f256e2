"""medclf.model.fold: BatchNorm folded into the convolution before it computes the same function."""

import copy

import pytest
import torch
import torch.nn as nn

from medclf.model.fold import fold_batchnorm
from medclf.model.networks import MirrorMean, build_model, penultimate


def _with_moved_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial values, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch", ["small_cnn", "efficientnet_lite0", "resnet18"])
def test_folded_network_answers_as_before(arch):
    torch.manual_seed(0)
    model = _with_moved_statistics(build_model(arch, 2))
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        logits, features = penultimate(model, arch, x)
    folded = copy.deepcopy(model)
    count = fold_batchnorm(folded)
    assert count == _batchnorms(model) > 0  # in these three every BatchNorm follows a convolution
    assert _batchnorms(folded) == 0
    with torch.inference_mode():
        logits2, features2 = penultimate(folded, arch, x)  # the head hook still finds the head
    torch.testing.assert_close(logits2, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features2, features, rtol=1e-4, atol=1e-5)


def test_mirror_mean_is_folded_inside():
    model = MirrorMean(_with_moved_statistics(build_model("small_cnn", 2)))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
        assert fold_batchnorm(model) == 8
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


class _Shared(nn.Module):
    """A convolution whose output feeds its BatchNorm and a second branch: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it, its children are folded one by one."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.shared = _Shared()

    def forward(self, x):
        if x.mean() > 0:
            return self.block(x) + self.shared(x)
        return self.block(x)


def test_only_plain_pairs_fold_and_untraceable_modules_fold_inside():
    model = _with_moved_statistics(_Untraceable())
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        before = model(x)
        assert fold_batchnorm(model) == 1  # block's pair; the shared convolution's stays
        assert isinstance(model.block[1], nn.Identity) and isinstance(model.shared.bn, nn.BatchNorm2d)
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_the_predictor_answers_with_a_folded_copy_and_the_artifact_is_untouched(tmp_path):
    import numpy as np

    from medclf.model.artifact import ModelCard, load_artifact, save_artifact
    from medclf.score.predictor import Predictor

    torch.manual_seed(0)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], positive_class="POSITIVE",
                     preprocess={"image_size": 32}, threshold=0.5)
    save_artifact(_with_moved_statistics(build_model("small_cnn", 2)), card, str(tmp_path / "model"))
    predictor = Predictor(str(tmp_path / "model"), "run", threads=1)
    assert _batchnorms(predictor.model) == 0
    network, _ = load_artifact(str(tmp_path / "model"))
    assert _batchnorms(network) == 8  # the stored weights keep their BatchNorms
    pixels = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    logits, features = predictor.logits_and_features(pixels)
    with torch.inference_mode():
        expected = penultimate(network, "small_cnn", torch.from_numpy(pixels).expand(-1, 3, -1, -1))
    np.testing.assert_allclose(logits, expected[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features, expected[1].numpy(), rtol=1e-4, atol=1e-5)
