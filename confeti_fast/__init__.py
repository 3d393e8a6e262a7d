"""confeti_fast: CONFETI unsupervised domain-adaptive semantic segmentation, fast."""
__version__ = "0.1.0"
