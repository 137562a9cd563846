"""Weight and activation quantization methods."""
