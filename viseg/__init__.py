"""viseg: nnU-Net-style segmentation training and Ray Tune sweeps over one shared core."""

__version__ = "0.1.0"
