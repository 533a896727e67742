"""Corpora: reading, cleaning, segmentation, tokenizer, fixed-length blocks."""
