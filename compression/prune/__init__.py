"""Unstructured, N:M and structured pruning methods."""
