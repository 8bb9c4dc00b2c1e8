"""pico: train small LLaMA-style language models and study how they learn."""

__version__ = "0.2.0"
