"""`mlxdg bench`: block diffusion versus autoregressive decoding, measured side by side."""
