"""labelrefine: train image classifiers on noisy labels and find the wrong ones."""

__version__ = "0.1.0"
