"""Kernels for LeanQuant weights that engines do not ship."""
