"""The affine stage's modes and defaults, torch-free so CLI help can name them."""

from __future__ import annotations

#: The ``affine`` modes of RegistrationEngine and ``regseg register --affine``.
AFFINE_MODES = ("learned", "optimise", "learned+optimise", "none")
#: The mode when none is asked for. Kept at the optimiser: on the validation pairs (seeds
#: 20000-20002, affine only) learned+optimise matched it (AAL Dice 0.674 vs 0.671) at about a
#: fifth of the time, but no full-pipeline validation run finished in issue 18's session; see the
#: README's affine-stage table before changing it.
AFFINE_DEFAULT = "optimise"
#: MIND optimisation steps per mode when none are asked for: the optimiser alone needs many from
#: its centre-of-mass start; after the network a few suffice (chosen on validation seeds
#: 20000.. with bench/affine_capture.py --validation).
DEFAULT_ITERATIONS = {"optimise": 120, "learned+optimise": 20, "learned": 0, "none": 0}
