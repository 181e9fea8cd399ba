"""Settings: every server-wide default and limit, defined once (settings.py)."""
