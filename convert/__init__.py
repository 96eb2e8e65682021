"""Conversion of trained ARMs to GGUF (issue 4 builds the Hugging Face / PEFT front ends).

Modules here that need only NumPy and `gguf` (such as `gguf_out`) are importable without torch.
"""
