"""From a radiograph to its labelmap: pre-processing, the segmenter, post-processing, labels."""
