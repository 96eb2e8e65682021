"""Conversion of trained ARMs to GGUF: Hugging Face checkpoints and PEFT adapters in, GGUF out.

Modules here that need only NumPy and `gguf` (such as `gguf_out`) are importable without torch.
"""
