"""The offline COCONUT trainer (``engine train``)."""
