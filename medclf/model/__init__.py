"""The model: networks and ensembles of them, the artifact format and its card, calibration, export."""
