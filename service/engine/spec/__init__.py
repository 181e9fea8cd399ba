"""Speculative decoding: draft-length policy, drafters, verification, the n-gram index."""
