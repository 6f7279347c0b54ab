"""Built-in checkpoint formats: safetensors folders, PyTorch ``.bin`` folders, GGUF files."""
