"""labelrefine: train image classifiers on noisy labels and find the wrong ones."""

__version__ = "0.1.0"

__all__ = ["__version__", "find_label_issues", "fit", "load_model"]


def __getattr__(name: str):
    # Lazy: ``import labelrefine`` (and the CLI's --help) must not import torch.
    if name in ("find_label_issues", "fit"):
        from . import api

        return getattr(api, name)
    if name == "load_model":
        from .predict import load_model

        return load_model
    raise AttributeError(f"module 'labelrefine' has no attribute {name!r}")
