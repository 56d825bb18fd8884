"""fedwa: a Flower simulator for weight-averaging methods on non-IID, long-tailed data."""

__version__ = "0.1.0"
