"""Labelled data sets, their cache and augmentation, synthetic phantoms, the predictions schema."""
