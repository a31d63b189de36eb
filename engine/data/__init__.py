"""Training data: the reference JSON format and the ProsQA-style generator."""
