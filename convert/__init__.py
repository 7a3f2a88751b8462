"""`mlxdg convert`: Hugging Face DiffusionGemma checkpoints to MLX, quantized."""
