"""LungSeg: right and left lung segmentation on 2D chest radiographs, built on MONAI and PyTorch."""
__version__ = "0.1.0"
