"""Simulator family B: a second, separately written phantom + TRUS simulator, for evaluation only.

Family A (``regseg.sim.phantom``, ``scanner``, ``bmode``, ``probe_path``) is what the models are
trained on. Family B shares none of its code or modelling choices, so accuracy measured on it says
how far the models carry beyond their own simulator:

- :mod:`.anatomy`: the gland is a star-shaped surface (ellipsoid radius times a random cubic
  polynomial on the unit sphere: spherical harmonics up to degree 3), 20-55 mm across, with
  peripheral, central and transition zones (two BPH lobes), anterior stroma, urethra, 1-3
  lobulated lesions of 4-15 mm that are hypo-, mildly hypo- or iso-echoic (the last invisible on
  TRUS), calcifications, a curved rectum, bladder, pubic bone, levator ani and obturator muscles,
  seminal vesicles, neurovascular bundles in fat. The MRI is an oblique axial T2 stack of
  0.5 x 0.5 x 3 mm voxels with slice-profile partial volume, a polynomial bias field and Rician
  noise; its labels are what a reader draws at the slice centres.
- :mod:`.probe`: an end-fire curved array (image plane through the probe axis) or a side-fire
  linear array, with their own frame sizes and pixel spacings.
- :mod:`.render`: RF simulation in beam coordinates: tissue-anchored hashed scatterers with
  K-distributed density, specular reflection at impedance steps, attenuation and shadowing, a
  Gaussian-modulated cosine pulse with a depth-dependent lateral width, electronic noise, Hilbert
  envelope, reverberation, slider TGC, log compression with a grey map, scan conversion.
- :mod:`.session`: a tracked probe sweeping the gland, a tracking error of set magnitude (mm, deg),
  probe-pressure indentation and smooth tissue motion, as :class:`regseg.types.Frame` with truth.

Family B is never used for training. Its evaluation cases are :data:`EVAL_SEEDS`.
"""

from __future__ import annotations

#: Phantom seeds of family B's evaluation set (disjoint from every family-A seed range in use).
EVAL_SEEDS = range(5000, 5100)
