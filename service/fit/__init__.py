"""Fit == load: params and their one derivation, the memory plan, the pair factory."""
