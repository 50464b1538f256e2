"""Ray Train fine-tuning."""
