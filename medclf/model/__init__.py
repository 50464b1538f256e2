"""The model: networks, the artifact format and its card, calibration, export."""
