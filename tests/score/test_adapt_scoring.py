"""score.adapt with real Ray scoring on phantom archives (issue 32 part A): a shifted archive loses AUC
without adaptation and regains it with `bn`; `auto` leaves an unshifted archive bit-identical and never
adapts a model whose verdict is negative; every row carries the profile id; the verdict guard."""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pytest
import torch

from medclf.config import ConfigError, load_config
from medclf.data.phantoms import generate, write_shifted
from medclf.data.predictions import read_predictions
from medclf.imaging.decode import decode
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.model.adapt import fit_bn_statistics, tensor_batches
from medclf.model.site_profile import read_profile
from medclf.model.artifact import ModelCard, load_card, republish_with_files, save_artifact
from medclf.model.networks import build_model
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(1200)
GAMMA, CONTRAST = 0.5, 0.6  # a new detector: brighter mid-tones, flatter contrast (explored: AUC 0.94 -> 0.70)


def labelled(root, n, seed):
    m = generate(root, n_train=n, n_test=0, image_size=32, formats=("png",), seed=seed)
    return [os.path.join(root, p) for p in m.path], (m.label == "POSITIVE").to_numpy().astype(int)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """small_cnn trained in-process (3 epochs, 600 phantoms; no Ray Train), its verdict measured by
    medclf.train.adapt_verdict on 300 labelled validation phantoms, a drift reference on them; and a copy
    whose card says the verdict is negative (same weights, same model id)."""
    from medclf.monitor.reference import add_reference
    from medclf.train.adapt_verdict import measure_verdict

    base = tmp_path_factory.mktemp("adapt_models")
    cfg = load_config(None, TINY)
    spec = cfg.preprocess
    train_paths, train_y = labelled(str(base / "train"), 600, 31)
    val_paths, val_y = labelled(str(base / "val"), 300, 32)

    def pixels(paths):
        return np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in paths])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = torch.from_numpy(pixels(train_paths)), torch.from_numpy(train_y)
        torch.manual_seed(0)
        model = build_model("small_cnn", 2)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        model.train()
        for _ in range(3):
            for b in torch.randperm(len(x)).split(32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(to_model_input(x[b])), y[b]).backward()
                opt.step()
        # Precise BatchNorm statistics on the training images (Wu & Johnson 2021): the running averages
        # of 3 short epochs lag the weights, and re-estimating them on any sample then moves even an
        # unshifted archive (zoom 0.9 lost 0.057 AUC, a negative verdict, with a fresh install's packages).
        fit_bn_statistics(model, "small_cnn", "finetune", tensor_batches(x.numpy()))
        model.eval()
        verdict = measure_verdict(model, "small_cnn", "finetune", pixels(val_paths), val_y, 1, 1.0, spec.mean,
                                  spec.std, sample=300, seed=0)
    finally:
        torch.set_num_threads(threads)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess=spec.model_dump(),
                     positive_class="POSITIVE", threshold=0.5, config={"model": {"transfer": "finetune"}},
                     adaptation=verdict)
    save_artifact(model, card, str(base / "plain"))
    positive = str(base / "positive")
    add_reference(str(base / "plain"), positive, val_paths, ["POSITIVE" if v else "NORMAL" for v in val_y])
    negative = str(base / "negative")
    card = load_card(positive)
    card.adaptation = {**card.adaptation, "verdict": "negative"}
    republish_with_files(positive, negative, card, {})
    return {"positive": positive, "negative": negative, "verdict": verdict}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """A new archive (200 fresh phantoms) as it is and under the gamma + contrast shift; the labels stay
    here, in the test: scoring gets folders of PNGs whose names say nothing of the class."""
    base = tmp_path_factory.mktemp("adapt_archives")
    paths, y = labelled(str(base / "clean"), 200, 33)
    clean = str(base / "clean_flat")
    os.makedirs(clean)
    flat = []
    for i, p in enumerate(paths):
        dest = os.path.join(clean, f"image{i:05d}.png")
        os.link(p, dest)
        flat.append(dest)
    shifted = write_shifted(paths, str(base / "shifted"), gamma=GAMMA, contrast=CONTRAST)
    return {"clean": clean, "shifted": os.path.dirname(shifted[0]), "y": y}


def config(tmp_path, *overrides):
    return load_config(None, TINY + [f"run.root={tmp_path / 'runs'}", "score.num_actors=1", *overrides])


def score(ray_cluster, cfg, model, archive, output, run_id):
    from medclf.score.batch import run_scoring

    summary = run_scoring(cfg, run_id, archive, model, output)
    rows = read_predictions(output)
    rows = rows[rows.run_id == run_id].copy()
    rows["index"] = rows.path.str.extract(r"(\d+)\.png$")[0].astype(int)
    return summary, rows.sort_values("index").reset_index(drop=True)


def auc(rows, y):
    from sklearn.metrics import roc_auc_score

    assert (rows.status == "ok").all() and len(rows) == len(y)
    return roc_auc_score(y[rows["index"]], rows.prob_POSITIVE)


def test_the_phantom_models_verdict_is_positive(models):
    v = models["verdict"]
    assert v["verdict"] == "positive", v["why"]
    assert [s["shift"] for s in v["sets"]][0] == "as is" and len(v["sets"]) == 6
    assert len(v["adapted_layers"]) == 8 and v["skipped_layers"] == {}


@pytest.mark.timeout(1200)
def test_shifted_archive_loses_auc_and_bn_restores_it(ray_cluster, models, archives, tmp_path):
    y = archives["y"]
    _, clean = score(ray_cluster, config(tmp_path), models["positive"], archives["clean"], str(tmp_path / "c"), "c")
    _, none = score(ray_cluster, config(tmp_path), models["positive"], archives["shifted"], str(tmp_path / "n"), "n")
    summary, bn = score(ray_cluster, config(tmp_path, "score.adapt=bn"), models["positive"], archives["shifted"],
                        str(tmp_path / "b"), "b")
    auc_clean, auc_none, auc_bn = auc(clean, y), auc(none, y), auc(bn, y)
    print(f"phantom AUC clean {auc_clean:.3f}, shifted {auc_none:.3f}, shifted + bn {auc_bn:.3f}")
    assert auc_clean > 0.85
    assert auc_none < auc_clean - 0.1  # the shift costs AUC
    assert auc_bn > auc_none + 0.1 and auc_bn > auc_clean - 0.05  # adaptation gives it back
    # provenance: one profile, its id in every row, the file beside the predictions, n = the whole archive
    (profile_path,) = glob.glob(str(tmp_path / "b" / "_site_profiles" / "*.npz"))
    profile = read_profile(profile_path, load_card(models["positive"]).model_id)
    assert set(bn.adaptation_id) == {profile.profile_id} and os.path.basename(profile_path)[:-4] == profile.profile_id
    assert profile.n_images == 200 and len(profile.layers) == 8
    assert none.adaptation_id.isna().all() and clean.adaptation_id.isna().all()
    assert "adapted" not in summary.adaptation or profile.profile_id[:12] in summary.adaptation
    # the endpoint's Predictor (medclf serve --site-profile) answers the same under that profile, to 1e-5
    import pyarrow as pa

    from medclf.imaging.stage import load_images
    from medclf.score.batch import Predictor

    served = Predictor(models["positive"], "serve", threads=1, site_profile=profile_path)
    table = pa.concat_tables([served(b) for b in load_images({"path": np.array(list(bn.path), object)},
                                                            served.card.preprocess, rows_per_batch=16)])
    np.testing.assert_allclose(table.column("prob_POSITIVE").to_numpy(), bn.prob_POSITIVE.to_numpy(), atol=1e-5)
    assert set(table.column("adaptation_id").to_pylist()) == {profile.profile_id}
    # Grad-CAM under that profile (medclf explain --site-profile; score.explain_flagged passes the run's own)
    # explains the same answers: its probability of POSITIVE is the row's, to 1e-5, and it records the id
    from medclf.report.gradcam import Explainer

    spec = served.card.preprocess
    explainer = Explainer(models["positive"], str(tmp_path / "cam"), target="POSITIVE", threads=1,
                          site_profile=profile_path)
    first = list(bn.path[:16])
    cams = explainer(next(iter(load_images({"path": np.array(first, object)}, spec, rows_per_batch=16))))
    np.testing.assert_allclose(cams["probability"], bn.prob_POSITIVE.to_numpy()[:16], atol=1e-5)
    assert set(cams["adaptation_id"]) == {profile.profile_id}
    plain = Explainer(models["positive"], str(tmp_path / "cam0"), target="POSITIVE", threads=1)
    unadapted = plain(next(iter(load_images({"path": np.array(first, object)}, spec, rows_per_batch=16))))
    assert np.abs(unadapted["probability"] - cams["probability"]).max() > 1e-3  # the profile is what differs
    # export bakes the profile in (medclf export --site-profile): the ONNX file answers as the rows do
    ort = pytest.importorskip("onnxruntime")
    from medclf.model.export import ONNX_FILE, export_artifact

    doc = export_artifact(models["positive"], str(tmp_path / "onnx"), ["onnx"], site_profile=profile_path)
    assert doc["adaptation_id"] == profile.profile_id
    session = ort.InferenceSession(os.path.join(str(tmp_path / "onnx"), ONNX_FILE), providers=["CPUExecutionProvider"])
    x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, load_config(None, TINY).preprocess)
                  for p in first]).astype(np.float32)
    _, onnx_probs = session.run(None, {"image": x})
    np.testing.assert_allclose(onnx_probs[:, 1], bn.prob_POSITIVE.to_numpy()[:16], atol=1e-4)
    # the same archive under another sample gives another profile and id
    from medclf.score.adaptation import prepare_adaptation

    from medclf.imaging.stage import list_inputs

    paths = list_inputs(archives["shifted"], [".png"])
    other = prepare_adaptation(config(tmp_path, "score.adapt=bn", "score.adapt_sample=60"), load_card(models["positive"]),
                               models["positive"], paths, str(tmp_path / "other"), "o")
    assert other.adapted and other.profile_id != profile.profile_id
    assert read_profile(other.profile_path).n_images == 60


@pytest.mark.timeout(1200)
def test_auto_leaves_an_unshifted_archive_bit_identical(ray_cluster, models, archives, tmp_path):
    _, none = score(ray_cluster, config(tmp_path), models["positive"], archives["clean"], str(tmp_path / "n"), "n")
    summary, auto = score(ray_cluster, config(tmp_path, "score.adapt=auto"), models["positive"], archives["clean"],
                          str(tmp_path / "a"), "a")
    assert "no drift" in summary.adaptation, summary.adaptation
    assert auto.adaptation_id.isna().all()
    np.testing.assert_array_equal(auto.prob_POSITIVE.to_numpy(), none.prob_POSITIVE.to_numpy())
    assert not os.path.exists(tmp_path / "a" / "_site_profiles")


def test_auto_adapts_a_shifted_archive_only_with_a_positive_verdict(models, archives, tmp_path):
    """The driver's decision (no Ray needed: the sample is decoded and scored in the driver)."""
    from medclf.imaging.stage import list_inputs
    from medclf.score.adaptation import prepare_adaptation

    paths = list_inputs(archives["shifted"], [".png"])
    cfg = config(tmp_path, "score.adapt=auto", "score.adapt_sample=120")
    yes = prepare_adaptation(cfg, load_card(models["positive"]), models["positive"], paths, str(tmp_path / "p"), "p")
    assert yes.adapted and yes.flags and "drift flagged" in yes.reason, yes.reason
    no = prepare_adaptation(cfg, load_card(models["negative"]), models["negative"], paths, str(tmp_path / "q"), "q")
    assert not no.adapted and no.profile_path is None and "verdict is negative" in no.reason
    assert not os.path.exists(tmp_path / "q")


def test_bn_on_a_negative_verdict_fails_before_any_work(models, archives, tmp_path):
    from medclf.score.batch import run_scoring

    cfg = config(tmp_path, "score.adapt=bn")
    with pytest.raises(ConfigError, match="verdict is negative.*adapt_override"):
        run_scoring(cfg, "r", archives["shifted"], models["negative"], str(tmp_path / "out"))  # Ray never started
    assert not os.path.exists(tmp_path / "out")
    old = load_card(models["negative"])
    old.adaptation = None  # an artifact trained before the verdict existed
    from medclf.score.adaptation import check_adapt_config

    with pytest.raises(ConfigError, match="verdict is absent"):
        check_adapt_config(cfg.score, old)
    check_adapt_config(config(tmp_path, "score.adapt=bn", "score.adapt_override=true").score, old)
    # a site profile of another model is refused too
    other = dataclasses.replace(load_card(models["positive"]), model_id="small_cnn-000000000000")
    profile_dir = tmp_path / "prof"
    from medclf.imaging.stage import list_inputs
    from medclf.score.adaptation import prepare_adaptation

    made = prepare_adaptation(config(tmp_path, "score.adapt=bn", "score.adapt_sample=20"),
                              load_card(models["positive"]), models["positive"],
                              list_inputs(archives["shifted"], [".png"]), str(profile_dir), "x")
    from medclf.model.site_profile import AdaptError

    with pytest.raises(AdaptError, match="belongs to model"):
        check_adapt_config(config(tmp_path, f"score.site_profile={made.profile_path}").score, other)


@pytest.mark.timeout(1200)
def test_training_stores_the_verdict_in_the_card(trained_model):
    """The Ray Train run of the shared fixture measured the verdict at its end (medclf.train.adapt_verdict)."""
    record = load_card(trained_model.model_path).adaptation
    assert record["verdict"] in ("positive", "negative", "inconclusive") and record["why"]
    assert [s["shift"] for s in record["sets"]][0] == "as is" and len(record["sets"]) == 6
    assert len(record["adapted_layers"]) == 8 and record["transfer"] == "finetune"
    assert record["basis"] in ("gain", "no gain", "no harm on saturated validation", "harm on saturated validation")
    assert all(0.0 <= s["auc_none"] <= 1.0 and 0.0 <= s["auc_bn"] <= 1.0 for s in record["sets"]
               if s["auc_none"] == s["auc_none"])


def test_prior_weighting_keeps_an_archives_prevalence_out_of_the_statistics(models, tmp_path):
    """Two archives from one phantom distribution, 10% and 90% positive: a prevalence shift and nothing
    else. Fitted as published (weighting none, what scoring does), each profile's statistics follow its
    prevalence; weighted to the training split's class shares (weighting prior, measured by
    benchmarks/adapt_prevalence.py and not adopted, docs/adaptation.md), they come out close, and the
    profile records the weighting and EM's estimate of each archive's prevalence. (Under the gamma +
    contrast shift of the other tests this model calls a 10% archive 100% positive, EM's estimate
    saturates, the weights come out flat and the fit is plain bn's: see medclf.model.adapt.fit_profile.)"""
    from medclf.model.adapt import fit_profile
    from medclf.model.artifact import load_artifact

    # The card facts the weighting reads: the training split's class counts (provenance) and the class totals
    # of the validation part the temperature (1.0) was fitted on (only tp + fn and tn + fp are read).
    card = load_card(models["positive"])
    card.provenance = {"training_data": {"images": {"train": {"NORMAL": 300, "POSITIVE": 300}}}}
    card.metrics = {"validation": {"tp": 150, "fn": 0, "tn": 150, "fp": 0}}
    spec = card.preprocess_spec
    stats = {}
    for share, seed in ((0.1, 41), (0.9, 42), (0.5, 43), (0.5001, 44)):  # two at 50%: the sampling noise
        m = generate(str(tmp_path / f"a{share}"), n_train=200, n_test=0, image_size=32, formats=("png",), seed=seed,
                     positive_fraction=share)
        pixels = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec)
                           for p in (str(tmp_path / f"a{share}" / q) for q in m.path)])
        for weighting in ("none", "prior"):
            model, _ = load_artifact(models["positive"])
            profile, _ = fit_profile(model, card, pixels, 0, weighting=weighting)
            if weighting == "prior":
                assert profile.extra["weighting"] == "prior", profile.extra
                assert abs(profile.extra["sample_prior"][1] - share) < 0.1, (share, profile.extra)
            else:
                assert profile.extra == {}  # what scoring writes: unchanged by this option
            stats[weighting, share] = profile.stats

    def distance(a, b):
        """Mean over layers and channels of the running means' difference, in units of the channel's std."""
        return float(np.mean([np.mean(np.abs(a[k][0] - b[k][0]) / np.sqrt(np.maximum(a[k][1], 1e-5))) for k in a]))

    # What two archives of the same prevalence differ by (other phantoms), then what 10% vs 90% adds to it.
    noise = distance(stats["none", 0.5], stats["none", 0.5001])
    plain = distance(stats["none", 0.1], stats["none", 0.9]) - noise
    weighted = distance(stats["prior", 0.1], stats["prior", 0.9]) - noise
    # measured: noise 0.0053, plain 0.0153 beyond it, weighted 0.0055 (the weights take away about 2/3)
    assert plain > noise and weighted < 0.5 * plain, (noise, plain, weighted)


def test_bn_warns_when_the_archive_prevalence_is_far_from_the_training_split(models, tmp_path):
    """A 10%-positive archive for a model trained at 50%: the decision says so (docs/adaptation.md: plain bn
    then moves the operating point); a 50% archive gets no warning; a card without the class shares, none."""
    from medclf.score.adaptation import prepare_adaptation

    card = load_card(models["positive"])
    card.provenance = {"training_data": {"images": {"train": {"NORMAL": 300, "POSITIVE": 300}}}}
    card.metrics = {"validation": {"tp": 150, "fn": 0, "tn": 150, "fp": 0}}
    model = str(tmp_path / "model")
    republish_with_files(models["positive"], model, card, {})
    card = load_card(model)
    cfg = config(tmp_path, "score.adapt=bn", "score.adapt_sample=200")
    said = {}
    for share, seed in ((0.1, 51), (0.5, 52)):
        m = generate(str(tmp_path / f"a{share}"), n_train=200, n_test=0, image_size=32, formats=("png",), seed=seed,
                     positive_fraction=share)
        paths = [str(tmp_path / f"a{share}" / p) for p in m.path]
        made = prepare_adaptation(cfg, card, model, paths, str(tmp_path / f"p{share}"), "w")
        assert made.adapted, made
        said[share] = made.reason
        if share == 0.1:
            plain = prepare_adaptation(cfg, load_card(models["positive"]), models["positive"], paths,
                                       str(tmp_path / "plain"), "w")
            assert plain.adapted and "WARNING" not in plain.reason  # no class shares on that card: no estimate
    assert "WARNING" in said[0.1] and "NORMAL films then score higher" in said[0.1], said[0.1]
    assert "WARNING" not in said[0.5], said[0.5]
