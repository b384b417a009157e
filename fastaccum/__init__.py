"""fastaccum: exact, fused gradient accumulation optimizers for PyTorch."""
__version__ = "0.1.0"
