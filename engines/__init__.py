"""regseg.engines."""
