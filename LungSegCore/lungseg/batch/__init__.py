"""`lungseg segment`: the batch over many inputs, its outputs and its review page."""
