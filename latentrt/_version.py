"""The package version, importable without importing the rest of latentrt."""

__version__ = "0.1.0"
