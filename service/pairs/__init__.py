"""Pairs by name: the registry, warm-up, and the one path that assembles a servable pair."""
