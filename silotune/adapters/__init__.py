"""LoRA factor types and their pure NumPy math (layer 2, imports no torch or Flower)."""
