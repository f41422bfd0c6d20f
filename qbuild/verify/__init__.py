"""Verification of compiled artifacts against the PyTorch reference."""
