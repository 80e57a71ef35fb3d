"""show1: an open, reproducible MLOps system for a Show-1 style cascaded text-to-video model."""

__version__ = "0.1.0"
