"""Scoring segmentations against references: metrics and `lungseg evaluate`."""
