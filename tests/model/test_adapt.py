"""Site adaptation core (medclf.model.adapt): BatchNorm statistics and site profiles, without Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from medclf.model.adapt import adaptable_layers, fit_bn_statistics, profile_from_fit, tensor_batches
from medclf.model.site_profile import AdaptError, apply_profile, read_profile, write_profile
from medclf.model.networks import build_model


def _sample(n=48, size=32, seed=0):
    """Two 'classes' of images with different intensity, so a class-sorted batch differs from a shuffled one."""
    g = np.random.default_rng(seed)
    x = g.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    x[: n // 2] += 1.5
    x[: n // 2] *= 0.5
    return x


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions on a loaded 2-core machine: more threads only fight each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained_stats(model):
    """'Training-archive' statistics: exact ones of another sample (one pass per layer makes them exact),
    so the adaptation below starts where a trained model would, close to the new archive's."""
    train = _sample(seed=11) * 1.3 + 0.2
    fit_bn_statistics(model, "small_cnn", "finetune", tensor_batches(train))
    return model


def _fit(model, x, passes=None, batch_size=16, order=None):
    x = x if order is None else x[order]
    return fit_bn_statistics(model, "small_cnn", "finetune", tensor_batches(x, batch_size), passes)


def test_statistics_do_not_depend_on_batching():
    torch.manual_seed(0)
    x = _sample()
    base = _trained_stats(build_model("small_cnn", 2).eval())
    sorted_model, shuffled_model, one_batch = (pytest.importorskip("copy").deepcopy(base) for _ in range(3))
    a = _fit(sorted_model, x, batch_size=8)  # class-sorted: each batch holds one class
    b = _fit(shuffled_model, x, batch_size=5, order=np.random.default_rng(3).permutation(len(x)))
    c = _fit(one_batch, x, batch_size=len(x))
    assert a.adapted == b.adapted == c.adapted and len(a.adapted) == 8
    # Equal up to float32 rounding of the forward passes (convolution kernels differ with the batch
    # size): measured in units of each channel's standard deviation.
    worst = 0.0
    for name in a.adapted:
        std = np.sqrt(a.stats[name][1])
        for other in (b, c):
            worst = max(worst, float(np.max(np.abs(a.stats[name][0] - other.stats[name][0]) / std)),
                        float(np.max(np.abs(np.sqrt(other.stats[name][1]) / std - 1))))
    assert worst < 1e-5, worst
    # and they are not what train-mode batch statistics of a class-sorted batch would give
    probe = pytest.importorskip("copy").deepcopy(base).train()
    with torch.no_grad():
        probe.features[0][1].momentum = None
        probe(torch.from_numpy(x[:8]).expand(-1, 3, -1, -1))
    assert not np.allclose(probe.features[0][1].running_mean.numpy(), a.stats["features.0.1"][0], atol=1e-3)


def test_statistics_are_exact_for_every_layer():
    x = _sample() * 0.8 + 0.3
    model = _trained_stats(build_model("small_cnn", 2).eval())
    fit = _fit(model, x)
    assert fit.n_images == len(x) and fit.passes == 8 and fit.last_change > 0.05
    # every adapted layer's statistics are exactly those of its input in the adapted model itself
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].double().clone()))
             for n, m in model.named_modules() if n in fit.adapted]
    with torch.no_grad():
        model(torch.from_numpy(x).expand(-1, 3, -1, -1))
    for h in hooks:
        h.remove()
    for name in fit.adapted:
        h = inputs[name]
        np.testing.assert_allclose(fit.stats[name][0], h.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fit.stats[name][1], h.var((0, 2, 3), unbiased=True).numpy(), rtol=1e-4)


def test_lite0_freeze_first_is_exact_with_the_block_cache():
    """EfficientNet-Lite0 (its stem a ModuleList, glue ReLU6 between blocks) with the shipped freeze_first:9."""
    model = build_model("efficientnet_lite0", 2).eval()
    x = _sample(n=6, size=64)
    fit = fit_bn_statistics(model, "efficientnet_lite0", "freeze_first:9", tensor_batches(x, 4))
    assert len(fit.adapted) == 25 and "_bn1" in fit.adapted  # blocks 8-15 (3 each) + the head's
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].double().clone()))
             for n, m in model.named_modules() if n in fit.adapted]
    with torch.no_grad():
        model(torch.from_numpy(x).expand(-1, 3, -1, -1))
    for h in hooks:
        h.remove()
    for name in fit.adapted:
        np.testing.assert_allclose(fit.stats[name][0], inputs[name].mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fit.stats[name][1], inputs[name].var((0, 2, 3)).numpy(), rtol=1e-3, atol=1e-6)


def test_frozen_layers_keep_their_statistics_and_are_named():
    model = _trained_stats(build_model("small_cnn", 2).eval())
    before = {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    fit = fit_bn_statistics(model, "small_cnn", "freeze_first:2", tensor_batches(_sample()))
    assert sorted(fit.skipped) == ["features.0.1", "features.0.4", "features.1.1", "features.1.4"]
    assert all("freeze_first:2" in why for why in fit.skipped.values())
    assert sorted(fit.adapted) == ["features.2.1", "features.2.4", "features.3.1", "features.3.4"]
    after = dict(model.named_modules())
    for name in fit.skipped:
        assert torch.equal(after[name].running_mean, before[name])
    for name in fit.adapted:
        assert not torch.equal(after[name].running_mean, before[name])
    # requires_grad of the caller's model untouched (the rule was applied to a copy)
    assert all(p.requires_grad for p in model.parameters())


def test_no_batchnorm_and_all_frozen_are_noops_that_say_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert adaptable_layers(model, "small_cnn", "finetune") == ([], {})
    fit = fit_bn_statistics(model, "small_cnn", "finetune", tensor_batches(_sample()), 2)
    assert fit.adapted == [] and "no BatchNorm" in fit.note
    frozen = fit_bn_statistics(build_model("small_cnn", 2), "small_cnn", "feature_extractor",
                               tensor_batches(_sample()), 2)
    assert frozen.adapted == [] and "frozen" in frozen.note and len(frozen.skipped) == 8


def test_lite0_freeze_first_skips_the_frozen_blocks():
    model = build_model("efficientnet_lite0", 2).eval()
    adapt, skipped = adaptable_layers(model, "efficientnet_lite0", "freeze_first:9")
    assert "_bn0" in skipped and "_blocks.7._bn2" in skipped  # stem + blocks 0..7 = the first 9 blocks
    assert "_blocks.8._bn0" in adapt and "_bn1" in adapt
    assert not set(adapt) & set(skipped)


def test_profile_round_trip_id_and_model_check(tmp_path):
    x = _sample()
    model = _trained_stats(build_model("small_cnn", 2).eval())
    fit = _fit(model, x)
    profile = profile_from_fit(fit, "small_cnn-abc", seed=5, source="archive A")
    path = write_profile(profile, str(tmp_path))
    assert os.path.basename(path) == profile.profile_id + ".npz"
    loaded = read_profile(path, "small_cnn-abc")
    assert loaded.profile_id == profile.profile_id and loaded.layers == sorted(fit.adapted)
    assert loaded.n_images == len(x) and loaded.seed == 5
    # same statistics -> same id; other statistics -> another id
    assert profile_from_fit(fit, "small_cnn-abc", 5, "archive A").profile_id == profile.profile_id
    other = profile_from_fit(_fit(_trained_stats(build_model("small_cnn", 2).eval()), x[:20], 2),
                             "small_cnn-abc", 5, "archive A")
    assert other.profile_id != profile.profile_id
    with pytest.raises(AdaptError, match="belongs to model small_cnn-abc"):
        read_profile(path, "small_cnn-other")
    # applying it to a fresh copy of the model reproduces the adapted model's outputs
    fresh = _trained_stats(build_model("small_cnn", 2).eval())
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "running" not in k}, strict=False)
    apply_profile(fresh, loaded)
    inp = torch.from_numpy(x[:4]).expand(-1, 3, -1, -1)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(inp).numpy(), model(inp).numpy(), atol=1e-6)


def test_altered_profile_is_refused(tmp_path):
    fit = _fit(_trained_stats(build_model("small_cnn", 2).eval()), _sample(), passes=1)
    profile = profile_from_fit(fit, "m", 0)
    path = write_profile(profile, str(tmp_path))
    data = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(data[: len(data) // 2]))
    with pytest.raises(AdaptError, match="not a readable site profile"):
        read_profile(path)
    with pytest.raises(AdaptError, match="not found"):
        read_profile(str(tmp_path / "none.npz"))


KILLED = """
import sys, numpy as np
from medclf.model.adapt import fit_bn_statistics, profile_from_fit, tensor_batches
from medclf.model.site_profile import write_profile
from medclf.model.networks import build_model
x = np.random.default_rng(0).normal(size=(16, 1, 32, 32)).astype(np.float32)
fit = fit_bn_statistics(build_model("small_cnn", 2).eval(), "small_cnn", "finetune", tensor_batches(x), 1)
write_profile(profile_from_fit(fit, "m", 0), sys.argv[1])
print("finished")
"""


def test_killed_pass_leaves_no_half_written_profile(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDCLF_ADAPT_FAULT": "profile_written"}  # dies with the bytes written, before the rename
    out = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 137 and "finished" not in out.stdout
    visible = [n for n in os.listdir(tmp_path) if not n.startswith(".")]
    assert visible == []  # only a hidden temporary file, which no reader looks at
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    env.pop("MEDCLF_ADAPT_FAULT")
    out = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    (done,) = [n for n in os.listdir(tmp_path) if n.endswith(".npz")]
    assert read_profile(str(tmp_path / done), "m").layers


def test_prediction_files_without_adaptation_id_are_still_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medclf.data.predictions import prediction_schema, read_predictions

    old = pa.schema([f for f in prediction_schema(["A", "B"]) if f.name != "adaptation_id"])  # before issue 32
    folder = tmp_path / "run_date=2026-01-01"
    folder.mkdir()
    pq.write_table(pa.table({f.name: pa.array([None], f.type) for f in old}, schema=old), folder / "part-old.parquet")
    new = prediction_schema(["A", "B"])
    pq.write_table(pa.table({f.name: pa.array(["abc" if f.name == "adaptation_id" else None], f.type) for f in new},
                            schema=new), folder / "part-new.parquet")
    rows = read_predictions(str(tmp_path))
    assert sorted(rows.adaptation_id.fillna("null")) == ["abc", "null"]


def test_weighted_statistics_count_each_image_by_its_weight():
    # Prevalence-weighted adaptation (medclf.model.prior_shift.prevalence_weights): equal weights change
    # nothing, and an image of weight 2 counts as that image twice, whatever the batching.
    import copy

    x = _sample() * 0.8 + 0.3
    base = _trained_stats(build_model("small_cnn", 2).eval())
    plain = _fit(copy.deepcopy(base), x)
    equal = fit_bn_statistics(copy.deepcopy(base), "small_cnn", "finetune", tensor_batches(x, 16), weights=np.full(len(x), 3.0))
    twice = np.r_[np.full(8, 2.0), np.ones(len(x) - 8)]
    weighted = fit_bn_statistics(copy.deepcopy(base), "small_cnn", "finetune", tensor_batches(x, 7), weights=twice)
    duplicated = _fit(copy.deepcopy(base), np.concatenate([x, x[:8]]), batch_size=16)
    for name in plain.adapted:
        std = np.sqrt(plain.stats[name][1])
        assert np.max(np.abs(equal.stats[name][0] - plain.stats[name][0]) / std) < 1e-6
        assert np.max(np.abs(equal.stats[name][1] / plain.stats[name][1] - 1)) < 1e-5
        # The same up to the unbiased variance factor, whose count differs (weights of mean 1: N S values
        # against (N + 8) S): 1e-3 of a variance at the first layer, 48/47 vs 56/55 where a layer's input is
        # 1 x 1, and through those, a little in the means of the layers after.
        first = name == plain.adapted[0]
        assert np.max(np.abs(weighted.stats[name][0] - duplicated.stats[name][0]) / std) < (1e-5 if first else 1e-2)
        assert np.max(np.abs(weighted.stats[name][1] / duplicated.stats[name][1] - 1)) < (1e-3 if first else 1e-2)
        assert np.max(np.abs(weighted.stats[name][0] - plain.stats[name][0]) / std) > 1e-3  # the weights mattered
    with pytest.raises(AdaptError, match="weights"):
        fit_bn_statistics(copy.deepcopy(base), "small_cnn", "finetune", tensor_batches(x, 16), weights=np.ones(5))
    with pytest.raises(AdaptError, match="non-negative"):
        fit_bn_statistics(copy.deepcopy(base), "small_cnn", "finetune", tensor_batches(x, 16),
                          weights=-np.ones(len(x)))


def test_prevalence_weights_make_the_sample_look_like_the_target_mix():
    # Calibrated posteriors of a sample holding 20% positives, from a model calibrated at 50%: EM finds
    # the 20% without labels, and weighted by them the sample's feature moments are those of a sample at
    # the training split's 80% (what BatchNorm statistics are: moments of the input, not label shares).
    from medclf.model.prior_shift import prevalence_weights

    g = np.random.default_rng(0)

    def draw(n, prevalence):
        y = (g.random(n) < prevalence).astype(int)
        return y, g.normal(1.5 * (2 * y - 1), 1.0)  # a likelihood ratio of exp(3 * feature) between the classes

    y, feature = draw(20000, 0.2)
    p_pos = 1 / (1 + np.exp(-3 * feature))  # calibrated at a 50% prior
    w, est = prevalence_weights(np.c_[1 - p_pos, p_pos], [0.5, 0.5], [0.2, 0.8])
    assert abs(est.prior[1] - 0.2) < 0.01
    assert abs(w.mean() - 1) < 1e-9 and (w > 0).all()
    _, target = draw(20000, 0.8)
    for f in (lambda v: v, lambda v: v > 1.0):  # the mean, and a share in the positives' tail
        weighted = np.sum(w * f(feature)) / np.sum(w)
        assert abs(weighted - np.mean(f(target))) < 0.05, (weighted, np.mean(f(target)))
        assert abs(np.mean(f(feature)) - np.mean(f(target))) > 0.3  # unweighted, they differ
