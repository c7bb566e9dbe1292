"""regseg.stream."""
