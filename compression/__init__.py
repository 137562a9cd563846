"""Compression methods: quantize, prune, merge, elastic sub-networks, dtype casts."""
