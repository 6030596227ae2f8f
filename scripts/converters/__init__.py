"""Checkpoint converters (timm gMLP and MLP-Mixer, the official R-Transformer) and what they share (`common`)."""
