"""The package version (its own module: the report reads it without importing the package)."""
__version__ = "0.1.0"
