"""pipeline: a two-stage image generator (hierarchical VQ-VAE-2 + autoregressive priors).

Importing the package has no side effects; heavy modules load on first use (``pipeline.Sampler``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Sampler":
        from pipeline.sampler import Sampler

        return Sampler
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
