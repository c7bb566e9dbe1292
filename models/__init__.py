"""regseg.models."""
