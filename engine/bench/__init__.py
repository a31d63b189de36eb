"""Benchmarks (``engine bench ...``): speed targets live here, printed as side-by-side ratios."""
