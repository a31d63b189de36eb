"""Python client for the COCONUT inference server (work in progress)."""
