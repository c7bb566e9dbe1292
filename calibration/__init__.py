"""regseg.calibration."""
