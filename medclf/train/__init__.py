"""Ray Train fine-tuning, and ensemble artifacts made from trained models."""
