"""The evaluation report's HTML page (summary.html): what was evaluated, the headline figures with their
95% CIs on the first screen, the tables in scrolling boxes, and the plots embedded, in one self-contained
file. The figures themselves come from medclf.report.evaluate."""

from __future__ import annotations

import base64
import html
from typing import Optional

import pandas as pd


def _adaptation_fact(counts: Optional[dict]) -> str:
    """Which BatchNorm statistics the evaluated rows were scored with (score.adapt's site profiles)."""
    if not counts:
        return "-"
    parts = [f"{'site profile ' + k[:12] if k != 'training statistics' else k} ({n} rows)" for k, n in counts.items()]
    mixed = "; the figures mix rows scored in different states of the model" if len(counts) > 1 else ""
    return ", ".join(parts) + mixed


def _ood_fact(oos: Optional[dict]) -> str:
    if not oos or not oos["n"]:
        return "none"
    reasons = ", ".join(f"{k}: {v}" for k, v in oos["reasons"].items())
    return f"{oos['n']} ({100 * oos['rate']:.1f}% of the files seen; {reasons}), not counted as predictions"


def _coverage_fact(sel: Optional[dict]) -> str:
    if not sel:
        return "-"
    return (f"{sel['coverage']:.3f} answered (abstention rate {sel['abstention_rate']:.3f}); accuracy on the answered "
            f"{sel['accuracy_on_scored']:.3f}; AURC {sel['aurc']:.4f} (risk-coverage curve below)")


def _table_html(table: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in table.columns]
    # In a scrolling box: a wide table (15 metric columns with CIs) scrolls inside it, not the page.
    body = table[cols].to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-", border=0)
    return f'<div class="scroll">{body}</div>'


def _headline(metrics: pd.DataFrame, n: int) -> str:
    """The first screen's figures: the stored operating point's AUC, sensitivity and specificity (or
    accuracy) with their 95% CIs."""
    row = metrics.iloc[0]
    parts = []
    for name, label in (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                        ("accuracy", "accuracy")):
        if name in row and pd.notna(row[name]):
            lo, hi = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
            ci = f" (95% CI {lo:.3f}-{hi:.3f})" if pd.notna(lo) and pd.notna(hi) else " (no CI)"
            parts.append(f"{label} {row[name]:.3f}{ci}")
    return (f"<p class='headline'>On {n} images, at the {html.escape(str(row['rule']))} operating point: "
            f"{html.escape('; '.join(parts))}.</p>")


def summary_html(summary: dict, tables: dict, pictures: dict) -> str:
    """One self-contained page: what was evaluated, the headline figures with CIs, tables, plots."""
    metrics = tables["metrics"].copy()
    headline = _headline(metrics, summary["n_evaluated"])
    for m in ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "roc_auc"):
        if f"{m}_ci_low" in metrics:
            metrics[m] = [f"{v:.3f} ({lo:.3f}-{hi:.3f})" if pd.notna(lo) else f"{v:.3f}"
                          for v, lo, hi in zip(metrics[m], metrics[f"{m}_ci_low"], metrics[f"{m}_ci_high"])]
    threshold = summary["threshold"]
    facts = [
        ("Predictions", summary.get("predictions", "-")),
        ("Labels", summary.get("labels", "-")),
        ("Model", ", ".join(summary["model_ids"]) or "-"),
        ("Classes", ", ".join(f"{c} ({n})" for c, n in summary["class_counts"].items())),
        ("Positive class", summary["positive_class"] or "- (multi-class: argmax)"),
        ("Decision threshold", "argmax" if threshold is None else f"{threshold:.4f} (stored in the model)"),
        ("Images evaluated", f"{summary['n_evaluated']} ({summary['n_failed']} failed to score, not counted)"),
        ("Site adaptation", _adaptation_fact(summary.get("adaptation"))),
        ("Out of scope", _ood_fact(summary.get("out_of_scope"))),
        ("Coverage", _coverage_fact(summary.get("selective"))),
    ]
    if "rows_dropped_note" in summary:
        facts.append(("Rows left out", summary["rows_dropped_note"]))
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    img = {name: base64.b64encode(png).decode() for name, png in pictures.items()}
    metric_cols = ["rule", "n", "threshold", "accuracy", "sensitivity", "specificity", "precision", "npv", "f1",
                   "roc_auc", "pr_auc", "brier", "ece", "log_loss", "balanced_accuracy"]
    subgroups = tables["subgroups"]
    sub_html = (_table_html(subgroups, ["group", "value", *[c for c in subgroups.columns if c.startswith("n_")],
                                        "accuracy", "sensitivity", "specificity", "f1", "roc_auc"])
                if not subgroups.empty else "<p>No grouping column with more than one value.</p>")

    def figure(name: str, alt: str) -> str:
        return f'<figure><img src="data:image/png;base64,{img[name]}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'

    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medclf evaluation report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }}
th, td {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figure img {{ max-width: 520px; }} .wide img {{ max-width: 100%; }}
.scroll {{ overflow-x: auto; max-width: 100%; }} .headline {{ font-size: 1.1em; font-weight: bold; }}
.facts td {{ overflow-wrap: anywhere; }} .scroll td, .scroll th {{ white-space: nowrap; }}
</style></head><body>
<h1>Evaluation report</h1>
{headline}
<table class="facts">{fact_rows}</table>
<h2>Operating points</h2>
<p>95% confidence intervals (stratified bootstrap) in brackets. <i>stored</i> is the threshold the model chose
on its own validation data; rules marked <i>on_this_data</i> are chosen on these labels (optimistic).</p>
{_table_html(metrics, metric_cols)}
<h2>Per class (one-vs-rest, at the stored operating point)</h2>
{_table_html(tables["per_class"], ["class", "n", "predicted", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"])}
<h2>Subgroups</h2>
{sub_html}
<h2>Plots</h2>
{figure("roc.png", "ROC curve, operating point marked")}
{figure("pr.png", "Precision-recall curve")}
{figure("confusion.png", "Confusion matrix at the stored threshold")}
{figure("reliability.png", "Reliability diagram (calibration)")}
{figure("histogram.png", "Score distribution per true class")}
{figure("risk_coverage.png", "Risk-coverage: error rate of the answered vs share answered (refused: grey)")}
<div class="wide">{figure("gallery.png", "Sample predictions, most confident errors first")}</div>
</body></html>
"""
