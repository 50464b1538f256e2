"""PNG plots (matplotlib, headless). Each function takes tables and returns PNG bytes."""

from __future__ import annotations

import io
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
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
