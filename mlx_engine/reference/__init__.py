"""Torch reference side of DFlash: drafter, target adapter and GGUF loader.

Torch is an optional extra (`pip install kakeya-mlx[torch]`): nothing in the MLX inference
path imports this package, and importing the package itself pulls in no torch.
"""
