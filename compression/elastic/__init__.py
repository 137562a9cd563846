"""Elastic sub-networks: nested training and extraction."""
