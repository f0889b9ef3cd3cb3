"""GPU kernels (Triton), installed as `wsimamba.kernels`. They know only tensors. See README.md here."""
