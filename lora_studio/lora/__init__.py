"""LoRA files and math: reading/writing formats, key maps, delta weights, rank selection."""
