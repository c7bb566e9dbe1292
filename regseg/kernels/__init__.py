"""Compiled CPU kernels (numba) for the few operations torch's CPU build runs slowly for us.

Each kernel has a torch twin it must equal to rounding (tested), is used only where a caller asks
for it (:func:`regseg.kernels.trilinear.enabled`), and falls back to torch where numba is missing.
"""
