"""medclf.model.conv_fusion: a convolution and the ReLU/ReLU6 after it, fused into one oneDNN call,
answer as the two steps did (bit for bit when oneDNN picks the same kernels; within float rounding
whatever it picks)."""

import copy

import numpy as np
import pytest
import torch
from torch import fx, nn

from medclf.model.conv_fusion import ConvActivation, fuse_conv_activation, fused_op_available
from medclf.model.fold import fold_batchnorm
from medclf.model.networks import MirrorMean, build_model, penultimate
from medclf.score.precision import cpu_has_bfloat16

pytestmark = pytest.mark.skipif(not fused_op_available(), reason="this torch build has no oneDNN fused convolution")


def _moved(arch: str) -> nn.Module:
    """A network whose BatchNorm statistics moved away from their initial values."""
    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def _folded(arch: str) -> nn.Module:
    model = _moved(arch)
    fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last)


def _fused(model: nn.Module) -> int:
    return sum(isinstance(m, ConvActivation) for m in model.modules())


@pytest.mark.parametrize("arch, expected", [("efficientnet_lite0", 31), ("resnet18", 8), ("small_cnn", 8)])
def test_fused_network_answers_as_before(arch, expected):
    model = _folded(arch)
    fused = copy.deepcopy(model)
    assert fuse_conv_activation(fused) == expected == _fused(fused)
    x = torch.rand(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    precisions = [False] + ([True] if cpu_has_bfloat16() else [])
    for bfloat16 in precisions:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            logits, features = penultimate(model, arch, x)
            logits2, features2 = penultimate(fused, arch, x)  # the head hook still finds the head
        tolerance = {"rtol": 1e-2, "atol": 1e-2} if bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(logits2, logits, **tolerance)
        torch.testing.assert_close(features2, features, **tolerance)


def test_wrappers_keep_their_type_and_names():
    model = MirrorMean(_folded("small_cnn"))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        before = penultimate(model, "small_cnn", x)
        assert fuse_conv_activation(model) == 8
        after = penultimate(model, "small_cnn", x)
    assert isinstance(model, MirrorMean)
    assert isinstance(model.inner, nn.Module) and hasattr(model.inner, "classifier")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


class _Branches(nn.Module):
    """conv1 -> Identity -> ReLU6 fuses; conv2's output also feeds a sum, so it stays two steps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gone = nn.Identity()  # what a folded BatchNorm became
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.gone(self.conv1(x)))
        z = self.conv2(y)
        return torch.relu(z) + z


def test_only_a_convolution_feeding_the_activation_alone_is_fused():
    model = nn.Sequential(_Branches()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        before = model(x)
        assert fuse_conv_activation(model) == 1
        assert isinstance(model[0], fx.GraphModule)  # traced one level: its convolutions stay calls
        assert isinstance(model[0].conv1, ConvActivation) and type(model[0].conv2) is nn.Conv2d
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_the_predictor_answers_with_a_fused_copy_as_the_stored_network(tmp_path):
    from medclf.model.artifact import ModelCard, load_artifact, save_artifact
    from medclf.score.predictor import Predictor

    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], positive_class="POSITIVE",
                     preprocess={"image_size": 32}, threshold=0.5)
    save_artifact(_moved("small_cnn"), card, str(tmp_path / "model"))
    predictor = Predictor(str(tmp_path / "model"), "run", threads=1)
    assert _fused(predictor.model) == 8
    network, _ = load_artifact(str(tmp_path / "model"))
    assert _fused(network) == 0  # what is stored stays plain
    pixels = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    logits, _ = predictor.logits_and_features(pixels)
    with torch.inference_mode():
        expected = network(torch.from_numpy(pixels).expand(-1, 3, -1, -1))
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_with_gradients_on_the_fused_module_runs_two_steps_and_backpropagates():
    model = _folded("small_cnn")
    fuse_conv_activation(model)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()  # the oneDNN op has no backward: Grad-CAM needs this path
    assert x.grad is not None and x.grad.abs().sum() > 0
