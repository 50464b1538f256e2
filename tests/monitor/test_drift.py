"""Drift reports (medclf.monitor.drift) on phantoms: the shared 1-epoch model gets a drift reference measured
on 400 labelled phantoms (the function training calls, via `add_reference`: no second training);
batches are scored by the real decode stage and Predictor (no Ray: tests/score/ covers the
Ray pipeline) and compared with it."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medclf.config import DriftConfig, load_config
from medclf.monitor.drift import DRIFT_EXIT, compare, holm, psi, wilson
from medclf.imaging.stage import load_images
from medclf.model.artifact import ModelError, load_artifact, load_card
from medclf.model.records import input_gate
from medclf.data.phantoms import generate, write_ct_like, write_shifted
from medclf.monitor.opened import open_model
from medclf.monitor.reference import REFERENCE_FILE
from medclf.data.predictions import EMB_COLUMNS
from medclf.imaging.stats import STAT_COLUMNS, image_stats
from medclf.score.batch import Predictor
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(900)


def phantom_files(root, n, seed, positive_fraction=0.5):
    manifest = generate(root, n_train=n, n_test=0, image_size=32, positive_fraction=positive_fraction,
                        formats=("png",), seed=seed)
    return [os.path.join(root, p) for p in manifest.path], list(manifest.label)


def tuned(trained_model, dest):
    """The shared 1-epoch model barely separates the classes (44 training images), and a prevalence
    shift moves the positive rate only through a model that does: the same network trained for 2
    epochs on 800 phantoms in-process (no second Ray training), saved as an artifact with the shared
    model's card (temperature 1, threshold: the median training score; the card's validation figures
    are not this model's)."""
    import dataclasses

    import torch

    from medclf.model.artifact import save_artifact
    from medclf.model.networks import build_model
    from medclf.data.phantoms import render
    from medclf.imaging.preprocess import preprocess_gray, to_model_input

    card = load_card(trained_model.model_path)
    y = torch.arange(800) % 2
    x = torch.from_numpy(np.stack([preprocess_gray(render(np.random.default_rng([20, 0, i]), np.random.default_rng(
        [20, 1, i]), 32, bool(y[i])).image, card.preprocess_spec) for i in range(800)]))
    torch.manual_seed(0)
    model = build_model(card.arch, 2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(2):
        for b in torch.randperm(800).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(to_model_input(x[b])), y[b]).backward()
            opt.step()
    # Precise BatchNorm statistics: after 50 steps the momentum-averaged running statistics still
    # trail the weights, and in eval mode the network called every phantom positive (median score
    # 1.000), which made the OOD and drift statistics of this fixture depend on that accident.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass below
    with torch.no_grad():
        for b in torch.arange(800).split(100):
            model(to_model_input(x[b]))
    with torch.no_grad():
        p = torch.softmax(model.eval()(to_model_input(x)), 1)[:, card.positive_index]
    card = dataclasses.replace(card, temperature=1.0, threshold=float(p.median()), domain=None, reference=None,
                               files={})
    save_artifact(model.eval(), card, dest)
    return dest


@pytest.fixture(scope="module")
def drift_model(trained_model, tmp_path_factory):
    """A model with a domain record (chest-film modalities) and a drift reference, both measured on
    400 fresh labelled phantoms (its own validation split has ~16 images)."""
    from medclf.monitor.ood import add_domain
    from medclf.monitor.reference import add_reference

    base = tmp_path_factory.mktemp("drift_model")
    paths, labels = phantom_files(str(base / "reference"), 400, seed=21)
    cfg = load_config(None, TINY + ["ood.enabled=true", "ood.quantile=0.95", "data.modalities=[CR, DX]"])
    add_domain(tuned(trained_model, str(base / "tuned")), str(base / "guarded"), cfg, paths, labels)
    dest = str(base / "model")
    add_reference(str(base / "guarded"), dest, paths, labels, seed=0)
    return dest


def score_table(model_path, paths, run_id="run", action="flag", site_profile=None):
    """Prediction rows as scoring writes them (decode stage + Predictor), as an Arrow table."""
    card = load_card(model_path)
    # ood.action=flag by default here: the drift statistics are measured on every decoded phantom, as
    # before refusal became the default (out_of_scope_rate counts flagged rows either way).
    predictor = Predictor(model_path, run_id, threads=1, ood_action=action, site_profile=site_profile)
    batches = load_images({"path": np.array(paths, object)}, card.preprocess, rows_per_batch=16,
                          gate=input_gate(card, action))
    table = pa.concat_tables([predictor(b) for b in batches])
    return table.drop_columns(["first_row"])


def score_frame(model_path, paths, run_id="run", action="flag", site_profile=None):
    return score_table(model_path, paths, run_id, action, site_profile).to_pandas()


@pytest.fixture(scope="module")
def pool(drift_model, tmp_path_factory):
    """1,000 scored phantoms from the reference's distribution (another seed)."""
    paths, _ = phantom_files(str(tmp_path_factory.mktemp("pool")), 1000, seed=22)
    return score_frame(drift_model, paths)


def report(drift_model, rows):
    opened = open_model(drift_model, network=False)
    return compare(rows, opened.reference, opened.domain, opened.card, DriftConfig())


def flagged(table):
    return set(table.loc[table["flag"], "statistic"])


def test_reference_is_in_the_artifact_and_scoring_measures_the_same_statistics(drift_model, pool, tmp_path):
    opened = open_model(drift_model, network=False)
    card, ref = opened.card, opened.reference
    rec = ref.record
    assert card.files[REFERENCE_FILE] and rec.n == 400 and rec.format_mix == {"png": 400}
    assert rec.modality_mix == {"none": 400} and 0.3 < rec.prevalence < 0.7 and rec.has_ood_scores
    assert ref.arrays["emb"].shape == (400, 4) and ref.arrays["emb_basis"].shape == (128, 4)
    assert ref.arrays["probs"].shape == (400, 2) and len(ref.arrays["ood_scores"]) == 400
    assert sum(rec.emb_variance_explained) <= 1.0
    # one rule: the statistics scoring wrote are those of the decoded file
    from medclf.imaging.decode import decode

    row = pool.iloc[0]
    expected = image_stats(decode(open(row.path, "rb").read(), row.path).image)
    assert {k: row[k] for k in STAT_COLUMNS} == pytest.approx(expected)
    assert pool[list(STAT_COLUMNS) + EMB_COLUMNS].notna().all().all()
    assert pool.img_height.eq(32).all() and pool.img_aspect.eq(1.0).all()
    # the reference file is sha256-checked like the weights
    import shutil

    altered = str(tmp_path / "altered")
    shutil.copytree(drift_model, altered)
    with open(os.path.join(altered, REFERENCE_FILE), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_artifact(altered)


def test_same_distribution_batches_rarely_flag(drift_model, pool):
    """False-alarm rate over 20 seeded batches of 200 drawn from the unshifted pool: at most 10%."""
    alarms = []
    for seed in range(20):
        rows = pool.sample(200, random_state=seed)
        table = report(drift_model, rows)
        alarms.append(sorted(flagged(table)))
        assert len(table) >= 14 and table["p_value"].notna().all()
    assert sum(bool(a) for a in alarms) <= 2, alarms


def test_gamma_shift_flags_the_intensity_statistics(drift_model, pool, tmp_path):
    paths = write_shifted(list(pool.path[:200]), str(tmp_path / "gamma"), gamma=0.6)
    table = report(drift_model, score_frame(drift_model, paths))
    got = flagged(table)
    assert {"img_mean", "img_p50"} <= got, table
    assert not got & {"img_height", "img_width", "img_aspect", "format_mix", "modality_mix"}
    mean = table.set_index("statistic").loc["img_mean"]
    assert mean.value > mean.reference and mean.psi > 0.25


def test_ct_like_phantoms_flag_modality_out_of_scope_and_embedding(drift_model, tmp_path):
    dicom = write_ct_like(str(tmp_path / "ct_dcm"), 60, image_size=32, seed=1, fmt="dcm")
    png = write_ct_like(str(tmp_path / "ct_png"), 140, image_size=32, seed=2, fmt="png")
    rows = score_frame(drift_model, dicom + png)
    assert (rows.loc[rows.path.isin(dicom), "status"] == "out_of_scope").all()  # CT: not this model's modality
    table = report(drift_model, rows)
    assert {"modality_mix", "format_mix", "out_of_scope_rate", "embedding", "ood_score"} <= flagged(table), table


def test_out_of_scope_rate_agrees_with_the_rows_under_refusal(drift_model, tmp_path):
    # The default action (out_of_scope): what the drift report counts is what the rows say, refused rows
    # over decoded rows, so a team reading either sees the same rate (issue 33, item 4).
    paths, _ = phantom_files(str(tmp_path / "night"), 120, seed=31)
    ct = write_ct_like(str(tmp_path / "ct"), 40, image_size=32, seed=3, fmt="dcm")  # another modality
    rows = score_frame(drift_model, paths + ct, action="out_of_scope")
    refused = rows["status"] == "out_of_scope"
    assert refused[rows.path.isin(ct)].all() and refused.sum() >= 40, rows["status"].value_counts()
    row = report(drift_model, rows).set_index("statistic").loc["out_of_scope_rate"]
    decoded = rows["status"].isin(["ok", "out_of_scope"])
    assert row.n == decoded.sum() == len(rows)
    assert row.value == pytest.approx(refused.sum() / decoded.sum())
    assert row.flag  # 40 of 160 refused, against about 5% of validation


def test_another_class_prevalence_flags_the_positive_rate(drift_model, pool, tmp_path):
    # 95% positives against the validation's ~50%: the predicted-positive rate moves with them.
    paths, _ = phantom_files(str(tmp_path / "prevalent"), 300, seed=23, positive_fraction=0.95)
    table = report(drift_model, score_frame(drift_model, paths)).set_index("statistic")
    rate = table.loc["positive_rate"]
    assert rate.flag and rate.value > rate.reference and rate.ci_low > rate.reference, rate
    assert not table.loc[["img_height", "img_width", "format_mix"], "flag"].any()


def test_answers_under_a_site_profile_are_compared_apart_from_the_unadapted_ones(drift_model, pool, tmp_path):
    # Issue 32: drift per profile. A night scored partly with the training statistics and partly with a site
    # profile fitted on it (as `score.adapt: bn` writes it): the score and positive-rate statistics compare each
    # state with validation on its own and name the profile; the input statistics, ood_score and embedding
    # (read from the network as trained under a profile) take every row.
    from medclf.score.adaptation import prepare_adaptation

    card = load_card(drift_model)
    paths = write_shifted(list(pool.path[:160]), str(tmp_path / "gamma"), gamma=0.85)  # mild: the guard lets it in
    profiles = []
    for seed in (0, 1):
        cfg = load_config(None, TINY + ["score.adapt=bn", "score.adapt_override=true", "score.adapt_sample=60",
                                        f"run.seed={seed}"])
        made = prepare_adaptation(cfg, card, drift_model, paths, str(tmp_path / f"out{seed}"), f"night{seed}")
        assert made.adapted and made.profile_path, made
        profiles.append(made)
    plain = score_frame(drift_model, paths[:80])
    adapted = score_frame(drift_model, paths[80:], site_profile=profiles[0].profile_path)
    assert plain["adaptation_id"].isna().all() and (adapted["adaptation_id"] == profiles[0].profile_id).all()
    score = f"score_{card.positive_class}"

    table = report(drift_model, pd.concat([plain, adapted], ignore_index=True)).set_index("statistic")
    for name, rows, state in ((score, plain, "training statistics"),
                              (f"{score} (adapted)", adapted, f"site profile {profiles[0].profile_id}")):
        alone = report(drift_model, rows).set_index("statistic")
        for stat in (name, name.replace(score, "positive_rate")):
            assert table.loc[stat, "n"] == len(rows) and table.loc[stat, "scored_with"] == state, table.loc[stat]
            # the same figures as a report on that state's rows alone
            assert table.loc[stat, "value"] == pytest.approx(alone.loc[stat, "value"])
            assert table.loc[stat, "test_statistic"] == pytest.approx(alone.loc[stat, "test_statistic"])
    # The answers moved under the profile, so the two states are not the same figure twice.
    assert table.loc[score, "value"] != pytest.approx(table.loc[f"{score} (adapted)", "value"], abs=1e-3)
    for stat in ("img_mean", "ood_score", "embedding", "out_of_scope_rate"):
        assert table.loc[stat, "n"] == 160 and pd.isna(table.loc[stat, "scored_with"]), table.loc[stat]

    # Two profiles in one selection (a date range of nightly profiles): each gets its own, named, rows.
    other = score_frame(drift_model, paths[:80], site_profile=profiles[1].profile_path)
    names = set(report(drift_model, pd.concat([adapted, other], ignore_index=True))["statistic"])
    assert {f"{score} (adapted {p.profile_id[:12]})" for p in profiles} <= names, names
    assert score not in names and "positive_rate" not in names


def write_night(folder, table, date, run_id):
    part = os.path.join(folder, f"run_date={date}")
    os.makedirs(part, exist_ok=True)
    pq.write_table(table.set_column(table.schema.get_field_index("run_id"), "run_id",
                                    pa.array([run_id] * len(table), pa.string())),
                   os.path.join(part, f"part-{run_id}.parquet"))


def test_cli_report_files_and_exit_status(drift_model, pool, tmp_path):
    from medclf.cli import run_command

    predictions = str(tmp_path / "predictions")
    base = pool.path.tolist()
    for night in range(3):  # three ordinary nights, then a night of brightened images
        write_night(predictions, score_table(drift_model, base[night * 200:(night + 1) * 200]), f"2026-11-0{night + 1}",
                    f"night{night}")
    shifted = write_shifted(base[600:800], str(tmp_path / "gamma"), gamma=0.6)
    write_night(predictions, score_table(drift_model, shifted), "2026-11-04", "night3")

    quiet = str(tmp_path / "quiet")
    assert run_command("drift", ["--model", drift_model, "--predictions", predictions, "--run-date", "2026-11-02",
                                 "--output", quiet]) == 0
    out = str(tmp_path / "report")
    assert run_command("drift", ["--model", drift_model, "--predictions", predictions, "--scoring-run", "night3",
                                 "--output", out]) == DRIFT_EXIT == 4
    for name in ("drift.parquet", "drift.html", "drift_histograms.png", "drift_timeseries.png",
                 "drift_history.parquet"):
        assert os.path.getsize(os.path.join(out, name)) > 1000, name
    table = pd.read_parquet(os.path.join(out, "drift.parquet"))
    assert {"statistic", "value", "reference", "test_statistic", "p_value", "psi", "flag"} <= set(table.columns)
    assert table.set_index("statistic").loc["img_mean", "flag"] and table["n"].eq(200).any()
    history = pd.read_parquet(os.path.join(out, "drift_history.parquet"))
    assert sorted(history.run_date.unique()) == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]
    night_flags = history[history.flag].run_date.unique()
    assert "2026-11-04" in night_flags
    assert "DRIFT: " in open(os.path.join(out, "drift.html")).read()
    # a date range and a bad selection
    assert run_command("drift", ["--model", drift_model, "--predictions", predictions, "--from", "2026-11-01",
                                 "--to", "2026-11-02", "--output", str(tmp_path / "range")]) == 0
    assert run_command("drift", ["--model", drift_model, "--predictions", predictions, "--run-date", "2030-01-01",
                                 "--output", str(tmp_path / "none")]) == 2


def test_statistics_helpers():
    rng = np.random.default_rng(0)
    assert psi(rng.normal(size=5000), rng.normal(size=5000)) < 0.02
    assert psi(rng.normal(size=5000), rng.normal(1.0, size=5000)) > 0.5
    assert psi(np.full(100, 512.0), np.full(50, 1024.0)) > 5  # a constant reference still separates sizes
    low, high = wilson(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.18, abs=0.01)
    assert holm(np.array([0.01, np.nan, 0.04, 0.03])) == pytest.approx([0.03, np.nan, 0.06, 0.06], nan_ok=True)


@pytest.mark.timeout(600)
def test_nightly_scoring_runs_drift_in_the_same_job(ray_cluster, trained_model, phantom_root, tmp_path):
    """score.drift_report: the scoring job writes the drift report of its own run and exits 4 on a flag."""
    import glob

    from medclf.cli import run_command

    night = write_shifted(sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png"))), str(tmp_path / "night"),
                          gamma=0.5, contrast=1.5)
    root = str(tmp_path / "runs")
    rc = run_command("score", ["--set", "score.cpus_per_actor=0.5", "--set", "score.batch_size=8",
                               "--set", "score.drift_report=true", "--run-root", root, "--run-id", "nightly",
                               "--input", str(tmp_path / "night"), "--model", trained_model.model_path,
                               "--output", str(tmp_path / "pred")])
    assert rc == DRIFT_EXIT
    table = pd.read_parquet(os.path.join(root, "nightly", "drift", "drift.parquet")).set_index("statistic")
    assert table.loc["img_mean", "flag"] and table.loc["img_mean", "n"] == len(night)
    assert os.path.getsize(os.path.join(root, "nightly", "drift", "drift.html")) > 1000
