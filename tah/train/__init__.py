"""Training library: batches from oracle labels, the two stages' losses (no Ray in here)."""
