"""Fine-tuning Stage C: python -m wurst.train."""
