"""distft: fine-tune language models on one CPU, one GPU, or many GPUs across nodes."""

__version__ = "0.1.0"
