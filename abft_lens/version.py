"""The package version (one place; run folders record it)."""

__version__ = "0.1.0"
