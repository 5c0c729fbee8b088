"""Exports of LeanQuant checkpoints to stock formats that other engines load without a plugin.

Each exporter reads a checkpoint through :mod:`leanquant_serve.format` one tensor at a time,
writes the new folder atomically, and refuses (with a one-line ``ValueError``) whatever the
target format cannot represent exactly.
"""
