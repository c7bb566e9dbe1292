"""The registration options every command that registers with the RegistrationEngine shares
(``regseg register``, ``regseg pseudolabel``, ``regseg batch register/segment``): their defaults,
how they were chosen, and the CPU threads used by default. Torch-free, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os

from regseg.cli_checks import int_at_least
from regseg.engines.affine_modes import (
    AFFINE_DEFAULT,
    AFFINE_MODES,
    DEFAULT_ITERATIONS,
    REFINE_MODE_DEFAULT,
    REFINE_MODES,
)

#: Most CPU threads ``regseg register`` uses by default. Measured on the 2-core machine (2 MNI152
#: pairs, s/pair): idle, 1 thread 5.87, 2 threads 4.99; with other jobs holding the cores (load
#: ~10), 1 thread 15, 2 threads 130 (OpenMP threads spinning against each other), 2 threads with
#: OMP_WAIT_POLICY=PASSIVE 20. So the entry point waits passively (regseg.cli) and uses the cores it
#: may run on, up to this many; more than 4 was not measured (no larger machine here).
MAX_DEFAULT_THREADS = 4

#: Instance-optimisation steps by default, on the network's working grid, then on the fixed
#: image's own grid (only images finer than the 48 x 64 x 48 working grid have that level).
#: Chosen by the rule in bench/results/registration_default_predeclared.md (written before the
#: run): the cheapest setting whose AAL Dice on the validation pairs (seeds 20000-20003, 1.5 mm,
#: fast steps) is at least ANTs SyN's + 0.01 in the same run. There (quiet 2-core CPU, 2 threads;
#: bench/results/registration_mni_1.5mm_validation_fast.json) ANTs SyN had 0.840 in 9.3 s per
#: pair; 25+0 0.870 (3.0 s), 25+10 0.876 (6.3 s), 50+0 0.880 (4.7 s), 50+20 0.885 (10.9 s),
#: 50+30 0.886 (13.1 s): 25 + 0. (Before the fast steps read MIND of the finer images, the same
#: rule chose 25 + 10.) Applied again with cheaper candidates (session 9, same pairs,
#: registration_mni_1.5mm_validation_fewer_steps.json): ANTs SyN 0.840; 10 steps 0.815, 15 0.846,
#: 20 0.862, 25 0.870: 20 + 0. Session 10 added ``--refine-mode sampled`` candidates (cheaper
#: steps, each on a random eighth of the voxels): the rule chose sampled with 25 steps
#: (engines/affine_modes.py has the numbers). Session 12's fourth round (larger step sizes, same
#: rule, bench/results/registration_step_size_predeclared.md) chose 15 steps at step size 0.1
#: (REFINE_LR_DEFAULT): AAL Dice 0.863 in 1.97 s against 25 steps at 0.05, 0.861 in 2.23 s.
#: Session 13's sixth round (same rule, bench/results/registration_steps_s13_predeclared.md) chose
#: 12 steps at step size 0.15: AAL Dice 0.864 in 1.65 s against 15 at 0.1, 0.863 in 1.90 s.
REFINE_DEFAULT = 12
REFINE_FINE_DEFAULT = 0


def add_registration_options(p: argparse.ArgumentParser, affine: str = AFFINE_DEFAULT,
                             why: str = "") -> None:
    """``--affine``, ``--affine-iterations``, ``--refine``, ``--refine-fine`` and
    ``--refine-mode``, as every command that registers with the RegistrationEngine takes them;
    ``affine``: this command's default mode, ``why``: a note on it for the help."""
    p.add_argument("--affine", choices=AFFINE_MODES, default=affine,
                   help="affine stage: learned (the Affine3D network, trained on brain MRI pairs), "
                   "optimise (MIND instance optimisation from the centre of mass), "
                   "learned+optimise (the network, then a few MIND steps) or none "
                   f"(default {affine}{why})")
    p.add_argument("--affine-iterations", type=int_at_least(0), default=None,
                   help="steps of the affine stage's MIND optimisation (default: "
                   f"{DEFAULT_ITERATIONS['optimise']} for optimise, "
                   f"{DEFAULT_ITERATIONS['learned+optimise']} after the network for "
                   "learned+optimise; 0: no affine stage)")
    p.add_argument("--refine", type=int_at_least(0), default=REFINE_DEFAULT, metavar="N",
                   help="instance optimisation: N steps refining the network's field on the pair "
                   "(MIND + diffusion, diffeomorphic); 0 = the network alone, faster and less "
                   f"accurate; see the README table (default {REFINE_DEFAULT})")
    p.add_argument("--refine-fine", type=int_at_least(0), default=REFINE_FINE_DEFAULT,
                   metavar="M",
                   help="then M steps on the fixed image's own grid when it is finer than the "
                   "network's 48 x 64 x 48 working grid (slower per step; 0: the working-grid "
                   f"field upsampled; default {REFINE_FINE_DEFAULT})")
    p.add_argument("--refine-mode", choices=REFINE_MODES, default=REFINE_MODE_DEFAULT,
                   help="how a refinement step runs: fast (MIND of the moving image computed once "
                   "and warped, the correction on a grid of every second voxel), sampled (fast, "
                   "each step's similarity at a fresh random eighth of the voxels) or full (MIND "
                   "recomputed on the warped image every step, every voxel: the first version, "
                   "slower and less accurate on the validation pairs; default "
                   f"{REFINE_MODE_DEFAULT})")


def default_threads() -> int:
    """The CPUs this process may run on (affinity, so containers and taskset are honoured), at
    most :data:`MAX_DEFAULT_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cpus))
