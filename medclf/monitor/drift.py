"""Drift reports: do tonight's images and answers still look like the validation images?

A nightly archive has no labels, so the model's validation figures cannot be re-checked on it.
What can be checked is whether its inputs and outputs are distributed like those of the
validation images the figures came from: the model artifact's drift reference (medclf.monitor.reference).
`compare` tests, for one batch of prediction rows (a scoring run, a run date or a range of them):

  * each per-image input statistic (intensity mean/sd/percentiles, height, width, aspect), the
    calibrated positive-class score and the ood_score: two-sample Kolmogorov-Smirnov p-value and
    population stability index (PSI, on the reference's quantile bins);
  * the predicted-positive rate (Wilson 95% CI) against the validation predicted-positive rate, and
    the out-of-scope rate against the validation rate: two-proportion z-tests;
  * the format mix and the DICOM modality mix: chi-square against the (smoothed) validation mix;
  * the penultimate-layer embedding (its first principal components): MMD with a permutation
    p-value (`drift.embedding_test`, or a classifier two-sample test).

Rows scored under a site profile or a site calibration (`adaptation_id`, `calibration_id`) got their
answers from another state of the model, so the score and positive-rate statistics are tested once per
state (`scoring_states`, the report's `scored_with` column); the other statistics take every row.

One family of tests per report: p-values are Holm-adjusted and a statistic flags when its adjusted
p-value is below `drift.alpha` AND its effect is large enough to matter (`drift.min_psi`,
`drift.min_rate_change`); on same-distribution phantom batches this keeps false alarms under 10%
(tests/monitor/test_drift.py; power: docs/benchmarks.md). `run_drift` writes the report folder:
drift.parquet (one row per statistic), drift_histograms.png, drift_timeseries.png (with several
run dates), drift_history.parquet and drift.html. The CLI exits `DRIFT_EXIT` when any flag trips.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.config import DriftConfig
from medclf.errors import UserError
from medclf.data.predictions import EMB_COLUMNS, prob_column
from medclf.imaging.stats import STAT_COLUMNS
from medclf.monitor.opened import open_model

log = logging.getLogger(__name__)

DRIFT_EXIT = 4  # any flag tripped: a scheduler can alert (2 is a user error, 3 LeaseHeld)
REPORT_COLUMNS = ["statistic", "kind", "value", "reference", "test", "test_statistic", "p_value", "p_adjusted",
                  "psi", "ci_low", "ci_high", "n", "n_reference", "flag", "scored_with", "detail"]
TRAINING_STATE = "training statistics"  # rows scored with neither a site profile nor a site calibration
# Rows that went through the decode stage (stats, format, modality); `ok` rows also have scores.
DECODED = ("ok", "out_of_scope")


class DriftError(UserError):
    """A drift report that cannot be made (no reference in the model, no rows selected)."""


@dataclass
class DriftResult:
    table: pd.DataFrame
    output: str
    files: list = field(default_factory=list)

    @property
    def flagged(self) -> list[str]:
        return list(self.table.loc[self.table["flag"], "statistic"])


# ---------------------------------------------------------------- selecting rows


def select_rows(predictions: pd.DataFrame, model_id: str, run_id: Optional[str] = None,
                run_date: Optional[str] = None, date_from: Optional[str] = None,
                date_to: Optional[str] = None) -> pd.DataFrame:
    """This model's rows of one scoring run, one run date, or a date range (inclusive)."""
    rows = predictions[predictions["model_id"] == model_id]
    dates = rows["run_date"].astype(str) if "run_date" in rows else pd.Series("", index=rows.index)
    if run_id:
        rows = rows[rows["run_id"] == run_id]
    if run_date:
        rows = rows[dates.loc[rows.index] == run_date]
    if date_from:
        rows = rows[dates.loc[rows.index] >= date_from]
    if date_to:
        rows = rows[dates.loc[rows.index] <= date_to]
    return rows


# ---------------------------------------------------------------- tests


def psi(reference: np.ndarray, batch: np.ndarray, bins: int = 10) -> float:
    """Population stability index on the reference's quantile bins. Values equal to a bin edge get
    their own bin, so a constant reference (every image 512 px) still separates 512 from 1024."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))

    def shares(x):
        idx = 2 * np.searchsorted(edges, x, "left") + np.isin(x, edges)
        return np.maximum(np.bincount(idx, minlength=2 * len(edges) + 1) / len(x), 1e-4)

    r, b = shares(reference), shares(batch)
    return float(((b - r) * np.log(b / r)).sum())


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def two_proportions(k1: int, n1: int, p0: float, n0: int, alternative: str = "two-sided") -> tuple[float, float]:
    """z statistic and p-value of k1/n1 against a reference share p0 measured on n0 images."""
    from scipy.stats import norm

    k0 = p0 * n0
    pooled = (k1 + k0) / (n1 + n0)
    se = np.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n1 + 1 / n0))
    z = (k1 / n1 - p0) / se
    p = norm.sf(z) if alternative == "greater" else 2 * norm.sf(abs(z))
    return float(z), float(p)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """Squared maximum mean discrepancy (biased V-statistic, RBF kernel with the pooled median distance
    as bandwidth) and its permutation p-value. All permutations in one matrix product."""
    z = np.concatenate([x, y])
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    bandwidth = np.median(d2[np.triu_indices(len(z), 1)]) or 1.0
    kernel = np.exp(-d2 / bandwidth)
    rng = np.random.default_rng(seed)
    signs = np.empty((len(z), permutations + 1))
    base = np.r_[np.full(len(x), 1 / len(x)), np.full(len(y), -1 / len(y))]
    signs[:, 0] = base
    for j in range(1, permutations + 1):
        signs[:, j] = rng.permutation(base)
    stats = ((kernel @ signs) * signs).sum(axis=0)
    return float(stats[0]), float((1 + (stats[1:] >= stats[0]).sum()) / (permutations + 1))


def classifier_test(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Classifier two-sample test: 2-fold cross-validated accuracy of a 10-nearest-neighbour classifier
    telling equal-sized samples of x and y apart, and its one-sided binomial p-value against 0.5."""
    from scipy.stats import binomtest
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    m = min(len(x), len(y))
    rng = np.random.default_rng(seed)
    z = np.concatenate([x[rng.permutation(len(x))[:m]], y[rng.permutation(len(y))[:m]]])
    labels = np.r_[np.zeros(m), np.ones(m)]
    predicted = cross_val_predict(KNeighborsClassifier(min(10, m - 1)), z, labels, cv=2)
    correct = int((predicted == labels).sum())
    return correct / (2 * m), float(binomtest(correct, 2 * m, 0.5, alternative="greater").pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN, and is not counted as a test)."""
    p = np.asarray(p, float)
    out = np.full(len(p), np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid])]
    m = len(order)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


# ---------------------------------------------------------------- the report


def compare(rows: pd.DataFrame, reference, domain, card, dc: DriftConfig) -> pd.DataFrame:
    """One row per statistic: the batch `rows` (prediction rows) against the model's `reference`
    (medclf.monitor.reference.Reference) and `domain` (medclf.monitor.ood.Domain or None)."""
    from scipy.stats import ks_2samp

    ref, rec = reference.arrays, reference.record
    decoded = rows[rows["status"].isin(DECODED)]
    ok = rows[rows["status"] == "ok"]
    out = []

    def distribution(name: str, batch, ref_values, what: str, alternative: str = "two-sided"):
        batch = np.asarray(pd.to_numeric(batch, errors="coerce"), float)
        batch = batch[~np.isnan(batch)]
        if len(batch) == 0 or len(ref_values) == 0:
            return
        ks = ks_2samp(batch, ref_values, alternative=alternative)
        out.append({"statistic": name, "kind": "distribution", "value": float(np.mean(batch)),
                    "reference": float(np.mean(ref_values)), "test": "ks" if alternative == "two-sided"
                    else "ks (batch larger)", "test_statistic": float(ks.statistic),
                    "p_value": float(ks.pvalue), "psi": psi(ref_values, batch, dc.bins), "n": len(batch),
                    "n_reference": len(ref_values), "detail": what})

    for name in STAT_COLUMNS:
        if name in decoded:
            distribution(name, decoded[name], ref[name], "mean of the batch vs mean of validation")
    pos = card.positive_index
    states = scoring_states(ok)
    groups = list(ok.groupby(states, sort=False))
    suffixes = [state_suffix(part) for _, part in groups]
    for (state, part), suffix in zip(groups, suffixes):
        # The answers depend on the site profile and calibration the rows were scored with, so each
        # state is compared with validation on its own; the inputs, ood_score and embedding do not
        # (the Predictor reads those from the network as trained), so they take every row.
        if suffixes.count(suffix) > 1:  # two profiles in one selection (a date range): name each
            suffix = f"{suffix[:-1]} {short_state(state)})"
        before = len(out)
        if pos is not None and prob_column(card.positive_class) in part:
            distribution(f"score_{card.positive_class}{suffix}", part[prob_column(card.positive_class)],
                         ref["probs"][:, pos], "calibrated positive-class probability")
        if pos is not None and rec.predicted_positive_rate is not None:
            k = int((part["predicted_label"] == card.positive_class).sum())
            z, p = two_proportions(k, len(part), rec.predicted_positive_rate, rec.n)
            low, high = wilson(k, len(part))
            out.append({"statistic": f"positive_rate{suffix}", "kind": "rate", "value": k / len(part),
                        "reference": rec.predicted_positive_rate, "test": "two-proportion z", "test_statistic": z,
                        "p_value": p, "ci_low": low, "ci_high": high, "n": len(part), "n_reference": rec.n,
                        "detail": f"predicted {card.positive_class} at the threshold the rows were scored with "
                                  f"(the model's: {card.threshold:.3g}); validation prevalence {rec.prevalence:.3f}"})
        for row in out[before:]:
            row["scored_with"] = state
    if rec.has_ood_scores and "ood_score" in rows:
        # One-sided: only less familiar matters, and the reference's out-of-fold scores run a little high.
        distribution("ood_score", rows["ood_score"], ref["ood_scores"], "distance from the training domain", "less")
    if domain is not None and len(decoded):
        scored = decoded["ood_score"].astype(float) if "ood_score" in decoded else pd.Series(np.nan, decoded.index)
        beyond = (decoded["status"] == "out_of_scope") | (scored > domain.record.threshold)
        k = int(beyond.sum())
        # The validation rate from the reference's own out-of-fold scores when it has them (medclf.monitor.reference);
        # artifacts from before it carry only the domain record's rate.
        p0, n0 = ((float((ref["ood_scores"] > domain.record.threshold).mean()), len(ref["ood_scores"]))
                  if len(ref["ood_scores"]) else (domain.record.validation_flag_rate, domain.record.n_fit))
        z, p = two_proportions(k, len(decoded), p0, n0, "greater")
        low, high = wilson(k, len(decoded))
        out.append({"statistic": "out_of_scope_rate", "kind": "rate", "value": k / len(decoded),
                    "reference": p0, "test": "two-proportion z (greater)",
                    "test_statistic": z, "p_value": p, "ci_low": low, "ci_high": high, "n": len(decoded),
                    "n_reference": n0,
                    "detail": "status out_of_scope, or ood_score above the domain threshold"})
    for column, mix, missing in (("format", rec.format_mix, "unknown"), ("modality", rec.modality_mix, "none")):
        if column in decoded and len(decoded):
            out.append(_mix_row(f"{column}_mix", decoded[column].fillna(missing).astype(str), mix))
    emb_cols = EMB_COLUMNS[:rec.emb_pcs]
    if all(c in ok for c in emb_cols) and len(ok):
        batch = ok[emb_cols].to_numpy(float)
        batch = batch[~np.isnan(batch).any(axis=1)]
        if len(batch) >= 5:
            out.append(_embedding_row(batch, ref["emb"][:, :rec.emb_pcs], dc))
    table = pd.DataFrame(out).reindex(columns=REPORT_COLUMNS)
    table["p_adjusted"] = holm(table["p_value"].to_numpy(float))
    table["flag"] = [_flag(r, dc) for r in table.itertuples()]
    return table


def scoring_states(rows: pd.DataFrame) -> pd.Series:
    """What each row's answer was scored with: TRAINING_STATE, or the site profile and site calibration
    ids (`adaptation_id`, `calibration_id`; medclf.score.adaptation, medclf.model.site_calibration)."""
    def ids(column: str, what: str) -> pd.Series:
        values = rows[column] if column in rows else pd.Series(None, index=rows.index, dtype=object)
        return values.map(lambda v: f"{what} {v}" if isinstance(v, str) and v else "")

    both = ids("adaptation_id", "site profile").str.cat(ids("calibration_id", "site calibration"), sep=" + ")
    return both.str.strip(" +").replace("", TRAINING_STATE)


def state_suffix(part: pd.DataFrame) -> str:
    """The statistic-name suffix of one scoring state: none for the training statistics (the names the
    reports always had), else " (adapted)", " (calibrated)" or " (adapted, calibrated)". The ids are in
    the report's `scored_with` column, so a nightly profile (a new id each night) keeps one name in the
    time series."""
    kinds = [word for column, word in (("adaptation_id", "adapted"), ("calibration_id", "calibrated"))
             if column in part and part[column].notna().any()]
    return f" ({', '.join(kinds)})" if kinds else ""


def short_state(state: str) -> str:
    """The first 12 characters of each id in a scoring state, for a statistic's name."""
    return "+".join(part.rsplit(" ", 1)[-1][:12] for part in state.split(" + "))


def _mix_row(name: str, values: pd.Series, reference: dict) -> dict:
    """Chi-square of the batch's category counts against the validation shares (add-one smoothed, so a
    category validation never had, e.g. CT, has a small expected count instead of none)."""
    from scipy.stats import chisquare

    counts = values.value_counts()
    cats = sorted(set(counts.index) | set(reference))
    observed = np.array([counts.get(c, 0) for c in cats], float)
    ref_counts = np.array([reference.get(c, 0) for c in cats], float)
    ref_share = (ref_counts + 1) / (ref_counts.sum() + len(cats))
    n = observed.sum()
    if len(cats) > 1:
        stat, p = chisquare(observed, ref_share * n)
    else:
        stat, p = 0.0, 1.0
    batch_share, val_share = observed / n, ref_counts / max(ref_counts.sum(), 1)
    shift = float(0.5 * np.abs(batch_share - val_share).sum())  # total variation distance
    detail = ", ".join(f"{c} {v:.2f} (validation {r:.2f})" for c, v, r in zip(cats, batch_share, val_share))
    return {"statistic": name, "kind": "mix", "value": shift, "reference": 0.0, "test": "chi-square",
            "test_statistic": float(stat), "p_value": float(p), "n": int(n), "n_reference": int(ref_counts.sum()),
            "detail": f"total variation distance; {detail}"}


def _embedding_row(batch: np.ndarray, reference: np.ndarray, dc: DriftConfig) -> dict:
    rng = np.random.default_rng(dc.seed)
    x = reference[rng.permutation(len(reference))[:dc.max_rows]]
    y = batch[rng.permutation(len(batch))[:dc.max_rows]]
    if dc.embedding_test == "mmd":
        stat, p = mmd_test(x, y, dc.permutations, dc.seed)
        test, what = "mmd permutation", "squared MMD (RBF kernel)"
    else:
        stat, p = classifier_test(x, y, dc.seed)
        test, what = "classifier (10-NN, binomial)", "cross-validated accuracy telling batch from validation"
    return {"statistic": "embedding", "kind": "embedding", "value": stat,
            "reference": 0.0 if dc.embedding_test == "mmd" else 0.5, "test": test, "test_statistic": stat,
            "p_value": p, "n": len(batch), "n_reference": len(reference),
            "detail": f"{what} of the first {reference.shape[1]} principal components of the penultimate features"}


def _flag(row, dc: DriftConfig) -> bool:
    if not row.p_adjusted < dc.alpha:
        return False
    if row.kind == "distribution":
        return bool(row.psi >= dc.min_psi)
    if row.kind in ("rate", "mix"):
        return bool(abs(row.value - row.reference) >= dc.min_rate_change)
    return True


# ---------------------------------------------------------------- the job


def run_drift(dc: DriftConfig, model_path: str, predictions: str, output: str, run_id: Optional[str] = None,
              run_date: Optional[str] = None, date_from: Optional[str] = None,
              date_to: Optional[str] = None) -> DriftResult:
    """Compare the selected rows of the predictions dataset with the model's reference; write the
    report folder `output`."""
    from medclf.data.predictions import read_predictions

    opened = open_model(model_path, network=False)
    card, reference, domain = opened.card, opened.reference, opened.domain
    if reference is None:
        raise DriftError(f"{model_path}: the model has no drift reference (trained before drift reports); "
                         "retrain it, or add one with medclf.monitor.reference.add_reference on labelled validation images")
    every = read_predictions(predictions)
    ours = select_rows(every, card.model_id)
    rows = select_rows(ours, card.model_id, run_id, run_date, date_from, date_to)
    if rows.empty:
        raise DriftError(f"{predictions}: no rows of model {card.model_id} for "
                         f"{_selection(run_id, run_date, date_from, date_to)}")
    table = compare(rows, reference, domain, card, dc)
    files = [_write(output, "drift.parquet", table.to_parquet(index=False))]
    history = _history(ours, reference, domain, card, dc)
    if not history.empty:
        files.append(_write(output, "drift_history.parquet", history.to_parquet(index=False)))
    from medclf.report.plots import drift_histograms, drift_timeseries

    files.append(_write(output, "drift_histograms.png", drift_histograms(rows, reference, card, table,
                                                                            scoring_states(rows))))
    if history["run_date"].nunique() > 1 if not history.empty else False:
        files.append(_write(output, "drift_timeseries.png", drift_timeseries(history)))
    what = _selection(run_id, run_date, date_from, date_to)
    page = drift_html(table, card.model_id, what, [f.rsplit("/", 1)[-1] for f in files if f.endswith(".png")],
                      predictions, len(rows))
    files.append(_write(output, "drift.html", page.encode()))
    result = DriftResult(table, output, files)
    log.info("drift of %s (%d rows): %s", what, len(rows),
             f"FLAGS {', '.join(result.flagged)}" if result.flagged else "no flag")
    return result


def _selection(run_id, run_date, date_from, date_to) -> str:
    if run_id:
        return f"scoring run {run_id}"
    if run_date:
        return f"run date {run_date}"
    if date_from or date_to:
        return f"run dates {date_from or '...'} to {date_to or '...'}"
    return "every run date"


def _write(output: str, name: str, data: bytes) -> str:
    path = storage.join(output, name)
    storage.write_bytes(path, data)
    return path


def _history(rows: pd.DataFrame, reference, domain, card, dc: DriftConfig) -> pd.DataFrame:
    """The report of each of the last `history_nights` run dates, stacked (the time series)."""
    if "run_date" not in rows or rows.empty:
        return pd.DataFrame()
    dates = sorted(rows["run_date"].astype(str).unique())[-dc.history_nights:]
    nights = []
    for date in dates:
        night = compare(rows[rows["run_date"].astype(str) == date], reference, domain, card, dc)
        nights.append(night.assign(run_date=date))
    return pd.concat(nights, ignore_index=True)


def _headline(table: pd.DataFrame) -> str:
    """The rates with their 95% (Wilson) CIs against validation: the first screen's figures."""
    parts = []
    for r in table[table["kind"] == "rate"].itertuples():
        ci = f" (95% CI {r.ci_low:.3f}-{r.ci_high:.3f})" if pd.notna(r.ci_low) else ""
        parts.append(f"{r.statistic.replace('_', ' ')} {r.value:.3f}{ci}, validation {r.reference:.3f}")
    return f"<p class='headline'>{html.escape('; '.join(parts))}.</p>" if parts else ""


def drift_html(table: pd.DataFrame, model_id: str, what: str, pictures: list[str], predictions: str = "",
               n_rows: Optional[int] = None) -> str:
    """The summary page: what was compared (model, data, n), verdict, the rates with CIs, the table
    (flags first, in a box that scrolls so the page stays within 1280 px) and the plots."""
    flagged = table[table["flag"]]
    verdict = (f"<p class='bad'>DRIFT: {len(flagged)} flag(s): {html.escape(', '.join(flagged['statistic']))}</p>"
               if len(flagged) else "<p class='good'>No drift flag.</p>")
    shown = table.sort_values(["flag", "p_adjusted"], ascending=[False, True])
    body = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0)
    images = "".join(f"<h2>{html.escape(p)}</h2><img src='{html.escape(p)}' style='max-width:100%'>" for p in pictures)
    source = (f" Predictions {html.escape(predictions)}" if predictions else "") + \
        (f", n = {n_rows} rows." if n_rows is not None else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift report {html.escape(what)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} td,th{{padding:2px 8px;text-align:right}}
.scroll{{overflow-x:auto;max-width:100%}} table{{font-size:0.85em}} td{{white-space:nowrap}}
td:last-child{{text-align:left;white-space:normal;min-width:14em}} p{{overflow-wrap:anywhere}}
.headline{{font-weight:bold}} .bad{{color:#b00;font-weight:bold}} .good{{color:#070;font-weight:bold}}</style></head><body>
<h1>Drift report: {html.escape(what)}</h1><p>Model {html.escape(model_id)}.{source} Each statistic is compared with the
model's validation images (its drift reference); p-values are Holm-adjusted over this table. docs/usage.md, "Drift
reports", says what each flag means and what to do.</p>{verdict}{_headline(table)}<div class="scroll">{body}</div>
{images}</body></html>"""
