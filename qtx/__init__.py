"""qtx: training and quantizing transformers without activation outliers, in JAX/Flax."""

__version__ = "0.1.0"
