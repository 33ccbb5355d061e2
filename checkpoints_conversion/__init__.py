"""Hugging Face <-> Megatron-Core checkpoint conversion."""
