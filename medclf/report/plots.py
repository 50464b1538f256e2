"""PNG plots (matplotlib, headless). Each function takes tables and returns PNG bytes."""

from __future__ import annotations

import io
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig, tight: bool = True) -> bytes:
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def training_curves(history: pd.DataFrame) -> bytes:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["epoch"], history["train_loss"], "o-", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    ax_loss.set(title="Loss per epoch", xlabel="epoch", ylabel="cross-entropy")
    ax_loss.legend()
    ax_acc.plot(history["epoch"], history["train_accuracy"], "o-", label="train accuracy")
    ax_acc.plot(history["epoch"], history["val_accuracy"], "o-", label="validation accuracy")
    if "val_roc_auc" in history:
        ax_acc.plot(history["epoch"], history["val_roc_auc"], "s--", label="validation ROC AUC")
    ax_acc.set(title="Accuracy / AUC per epoch", xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def roc_plot(roc: pd.DataFrame, aucs: dict, operating_point: Optional[tuple[float, float]] = None) -> bytes:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, part in roc.groupby("class", sort=False):
        ax.plot(part["fpr"], part["tpr"], label=f"{name} (AUC {aucs.get(name, float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="red", markersize=8, label="operating point")
    ax.set(title="ROC curve", xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion_plot(confusion: pd.DataFrame, classes: list[str]) -> bytes:
    k = len(classes)
    cm = np.zeros((k, k), int)
    for row in confusion.itertuples():
        cm[classes.index(row.true_label), classes.index(row.predicted_label)] = row.count
    fig, ax = plt.subplots(figsize=(1.6 * k + 2.5, 1.4 * k + 2))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(title="Confusion matrix", xlabel="predicted label", ylabel="true label")
    return _png(fig)


def pr_plot(pr: pd.DataFrame, aps: dict, prevalence: dict, operating_point: Optional[tuple[float, float]] = None) -> bytes:
    """Precision-recall curves; the dotted line per class is its prevalence (a random model)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, part in pr.groupby("class", sort=False):
        line, = ax.plot(part["recall"], part["precision"], label=f"{name} (AP {aps.get(name, float('nan')):.3f})")
        if name in prevalence:
            ax.axhline(prevalence[name], ls=":", color=line.get_color(), alpha=0.7,
                       label=f"{name} prevalence {prevalence[name]:.2f} (chance)")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="red", markersize=8, label="operating point")
    ax.set(title="Precision-recall curve", xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return _png(fig)


def reliability_plot(calibration: pd.DataFrame, what: str, ece: float) -> bytes:
    """Reliability diagram (observed rate vs mean predicted probability per bin) with bin counts."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    used = calibration[calibration["count"] > 0]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot(used["mean_predicted"], used["fraction_positive"], "o-", label=f"model (ECE {ece:.3f})")
    ax.set(title="Reliability diagram", ylabel=f"observed fraction ({what})", xlim=(0, 1), ylim=(-0.01, 1.01))
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    width = (calibration["bin_high"] - calibration["bin_low"]).to_numpy()
    ax_n.bar(calibration["bin_low"], calibration["count"], width=width, align="edge", color="tab:blue", alpha=0.6)
    ax_n.set(xlabel="mean predicted probability", ylabel="images")
    ax_n.grid(alpha=0.3)
    return _png(fig)


def score_histogram(scores_by_class: dict, score_name: str, threshold: Optional[float] = None) -> bytes:
    """Distribution of one score per true class: how well the classes separate, where the threshold cuts."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    for name, scores in scores_by_class.items():
        ax.hist(scores, bins=bins, alpha=0.55, label=f"true {name} (n={len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label=f"threshold {threshold:.3f}")
    ax.set(title="Score distribution by true class", xlabel=score_name, ylabel="images")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def gallery_plot(images: list, captions: list[str], wrong: list[bool], title: str, columns: int = 4) -> bytes:
    """Grid of images with captions; wrong predictions framed in red."""
    n = max(1, len(images))
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.7 * rows), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 1.0 / (3.7 * rows), hspace=0.45, wspace=0.1)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        if images[k] is not None:
            ax.imshow(images[k], cmap="gray", vmin=0, vmax=1)
        else:
            ax.text(0.5, 0.5, "image not readable", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(captions[k], fontsize=8, color="red" if wrong[k] else "black", pad=4)
        if wrong[k]:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("red")
                spine.set_linewidth(3)
    fig.suptitle(title, y=1 - 0.15 / (3.7 * rows), va="top")
    return _png(fig, tight=False)


def drift_histograms(rows: pd.DataFrame, reference, card, table: pd.DataFrame,
                     states: Optional[pd.Series] = None) -> bytes:
    """Reference (validation) vs batch histograms of each distribution statistic of a drift report;
    a flagged statistic's title is red. `states`: each row's scoring state (medclf.monitor.drift.scoring_states),
    so a score histogram shows the rows of the state its report row compares; None: every row."""
    from medclf.data.predictions import prob_column

    dist = table[table["kind"] == "distribution"]
    n = max(1, len(dist))
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, r in zip(axes.ravel(), dist.itertuples()):
        name = r.statistic
        if name.startswith("score_"):  # the rows of the scoring state this row compares (medclf.monitor.drift)
            ref = reference.arrays["probs"][:, card.positive_index]
            ok = (rows["status"] == "ok") & (True if states is None else states == r.scored_with)
            batch = rows.loc[ok, prob_column(card.positive_class)]
        elif name == "ood_score":
            ref, batch = reference.arrays["ood_scores"], rows["ood_score"]
        else:
            ref, batch = reference.arrays[name], rows[name]
        batch = pd.to_numeric(batch, errors="coerce").dropna().to_numpy(float)
        both = np.concatenate([ref, batch])
        lo, hi = np.quantile(both, [0.0, 1.0])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        ax.hist(ref, bins=bins, density=True, alpha=0.5, label="validation")
        ax.hist(batch, bins=bins, density=True, alpha=0.5, label="batch")
        ax.set_title(f"{name}\nPSI {r.psi:.3f}, p_adj {r.p_adjusted:.2g}", fontsize=8,
                     color="#b00" if r.flag else "black")
        ax.tick_params(labelsize=7)
    axes.ravel()[0].legend(fontsize=7)
    return _png(fig)


def drift_timeseries(history: pd.DataFrame) -> bytes:
    """Each drift statistic's value per run date (validation value dashed); flagged nights in red."""
    names = list(dict.fromkeys(history["statistic"]))
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        part = history[history["statistic"] == name].sort_values("run_date")
        x = np.arange(len(part))
        ax.plot(x, part["value"], "o-", ms=3, color="#1f77b4")
        flagged = part["flag"].to_numpy(bool)
        ax.plot(x[flagged], part["value"].to_numpy()[flagged], "o", color="#b00", ms=6)
        ax.axhline(part["reference"].iloc[0], ls="--", color="grey", lw=1)
        ax.set_xticks(x, [d[5:] for d in part["run_date"]], fontsize=6, rotation=45)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    return _png(fig)
