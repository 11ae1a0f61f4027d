"""AsyncOPD: asynchronous on-policy distillation with bounded staleness."""

__version__ = "0.1.0"
