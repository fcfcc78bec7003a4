"""The networks (PyTorch, MONAI), built by name from a registry."""
