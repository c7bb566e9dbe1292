"""regseg: real-time MRI-TRUS fusion and the offline registration/segmentation toolkit."""

__version__ = "0.1.0"
