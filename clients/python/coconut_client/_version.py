"""The package version (kept in step with ``clients/python/pyproject.toml``)."""

__version__ = "0.1.0"
