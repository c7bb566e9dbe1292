"""regseg.train."""
