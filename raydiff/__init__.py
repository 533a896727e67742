"""raydiff: stabilised embedding-space diffusion language models, orchestrated by Ray."""

__version__ = "0.1.0"
