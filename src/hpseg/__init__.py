"""hpseg: unsupervised semantic segmentation with Hidden Positives on frozen self-supervised ViTs."""

__version__ = "0.1.0"
