"""The engine: one thread steps every slot (scheduler, slots, sampling, streams, prompt cache)."""
