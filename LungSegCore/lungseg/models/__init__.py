"""Model cards and the shipped weights: finding, reading, loading and saving models."""
