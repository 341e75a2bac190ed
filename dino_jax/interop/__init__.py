"""Interoperability with the official PyTorch DINO: checkpoint files and parameter layouts."""
