"""Shipped YAML recipes (each is run by the tests on a tiny model)."""
