"""Selective prediction: accuracy beside coverage, and the risk-coverage curve (issue 33).

A model that refuses some inputs (status out_of_scope) is judged on two numbers, not one: how
much it answered (coverage) and how often those answers were wrong (risk). Accuracy on the scored
rows alone would reward refusing everything hard. Coverage here counts the labelled rows that were
scored or refused (failed rows are no decision either way); the curve then keeps the scored rows
in decreasing confidence (probability of the decided class), so its right end is the operating
point the product ran at, and its area (AURC, Geifman et al. 2019) summarises it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def risk_coverage(correct: np.ndarray, confidence: np.ndarray, n_refused: int) -> pd.DataFrame:
    """coverage (share of scored + refused rows answered) and risk (error rate of those answered),
    keeping the most confident scored rows first."""
    correct = np.asarray(correct, bool)
    order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
    kept = np.arange(1, len(order) + 1)
    errors = np.cumsum(~correct[order])
    total = len(order) + n_refused
    return pd.DataFrame({"kept": kept, "coverage": kept / total if total else kept * np.nan,
                         "risk": errors / kept, "confidence": np.asarray(confidence, np.float64)[order]})


def selective_summary(curve: pd.DataFrame, n_scored: int, n_refused: int) -> dict:
    total = n_scored + n_refused
    risk = float(curve["risk"].iloc[-1]) if len(curve) else float("nan")
    # AURC over the answered range (trapezoids in coverage); lower is better
    aurc = float(np.trapezoid(curve["risk"], curve["coverage"])) if len(curve) > 1 else float("nan")
    return {"coverage": n_scored / total if total else float("nan"),
            "abstention_rate": n_refused / total if total else float("nan"),
            "accuracy_on_scored": 1 - risk, "risk_on_scored": risk, "aurc": aurc,
            "n_scored": int(n_scored), "n_refused": int(n_refused)}


def risk_coverage_plot(curve: pd.DataFrame, summary: dict) -> bytes:
    from medclf.report.plots import _png, plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(curve["coverage"], curve["risk"], lw=1.5)
    if len(curve):
        ax.scatter([curve["coverage"].iloc[-1]], [curve["risk"].iloc[-1]], color="C3", zorder=3,
                   label=f"as run: coverage {summary['coverage']:.3f}, accuracy {summary['accuracy_on_scored']:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    ax.axvspan(summary["coverage"] if summary["coverage"] == summary["coverage"] else 1.0, 1.0, color="0.9",
               label="refused (out of scope)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, float(curve["risk"].max()) * 1.1 if len(curve) else 1.0))
    ax.set_xlabel("coverage (share of labelled images answered)")
    ax.set_ylabel("risk (error rate of the answered)")
    ax.set_title(f"Risk-coverage (AURC {summary['aurc']:.4f}); grey: refused")
    return _png(fig)
