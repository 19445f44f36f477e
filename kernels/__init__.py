"""Triton kernels of the engine (installed as engine.kernels)."""
