"""Attention Free Transformer (Zhai et al., 2021): model_type `aft`."""
