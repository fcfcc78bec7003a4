"""Training, data sets, losses, export of a trained run as a model, and cross-validation."""
