"""Model merging and task arithmetic."""
