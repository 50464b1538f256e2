"""Evaluation: metrics, plots, reports, Grad-CAM."""
