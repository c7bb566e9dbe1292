"""Simulators: the prostate phantom, the simulated TRUS scanner (family A), the MNI152 subjects."""
