"""The registration stages' modes and defaults (affine stage, instance optimisation), torch-free
so CLI help can name them."""

from __future__ import annotations

#: The ``affine`` modes of RegistrationEngine and ``regseg register --affine``.
AFFINE_MODES = ("learned", "optimise", "learned+optimise", "none")
#: The mode when none is asked for: the network, then 20 MIND steps. On the validation pairs
#: (seeds 20000.., never the eval pairs) it matched the 120-step optimiser: affine only, 3.25 mm,
#: AAL Dice 0.674 vs 0.671; the whole pipeline at 1.5 mm (pair 20000), 0.791 vs 0.789 with 25
#: refinement steps and 0.828 vs 0.828 with 50, in 19.5 s vs 31.4 s and 32.3 s vs 51.4 s per
#: pair (loaded 2-core machine, same run); it also captures larger misalignments (the README's
#: capture table). ``--affine optimise`` is the previous default.
AFFINE_DEFAULT = "learned+optimise"
#: MIND optimisation steps per mode when none are asked for: the optimiser alone needs many from
#: its centre-of-mass start; after the network a few suffice (chosen on validation seeds
#: 20000.. with bench/affine_capture.py --validation).
DEFAULT_ITERATIONS = {"optimise": 120, "learned+optimise": 20, "learned": 0, "none": 0}

#: How an instance-optimisation step runs (:mod:`regseg.engines.refine`): ``fast`` warps the moving
#: image's MIND descriptor and optimises a correction on a grid of every second voxel; ``full``
#: (the first version) recomputes MIND on the warped image and optimises every voxel; ``sampled``
#: is ``fast`` with each step's similarity at a fresh random eighth of the working grid's voxels.
REFINE_MODES = ("fast", "sampled", "full")
#: ``fast``: on the 1.5 mm validation pairs 20000-20003, 50 steps gave AAL Dice 0.880 in 4.7 s per
#: pair against 0.803 in 12.3 s (README, "Instance optimisation: fast steps"). ``sampled`` since
#: session 10, by the rule in bench/results/registration_sampled_predeclared.md (written before the
#: run; same pairs, bench/results/registration_mni_1.5mm_validation_sampled.json): ANTs SyN 0.840;
#: fast 15 / 20 steps 0.846 / 0.862 (4.2 / 5.0 s), sampled 20 / 25 / 30 0.850 / 0.861 / 0.868
#: (4.7 / 4.3 / 4.8 s): sampled 25 steps is the cheapest at ANTs + 0.01.
REFINE_MODE_DEFAULT = "sampled"

#: Scaling-and-squaring steps inside the ``fast``/``sampled`` refinement loop (None: the model's,
#: 7); the returned velocity is still integrated with 7. See regseg.engines.refine,
#: ``loop_int_steps``. 5 since session 12, by the rule in
#: bench/results/registration_loop_int_predeclared.md (written before the run; validation pairs
#: 20000-20003, bench/results/registration_mni_1.5mm_validation_loop_int.json): ANTs SyN 0.840;
#: 25 sampled steps with loop 7 / 5 / 4: AAL Dice 0.861 / 0.861 / 0.861 in 3.27 / 2.949 / 2.949 s;
#: 20 steps 0.850 / 0.850 / 0.850 (below ANTs + 0.01 by 2-4e-4). Loop 5 and 4 tied to the
#: millisecond; the rule's "cheapest" took 5, by 0.2 ms.
REFINE_INT_STEPS_DEFAULT: int | None = 5

#: Where the ``fast``/``sampled`` steps take their diffusion penalty: ``working`` (the working
#: grid, the network's velocity plus the upsampled correction) or ``coarse`` (the correction grid;
#: no upsampling per step). See regseg.engines.refine, ``coarse_regulariser``. ``coarse`` since
#: session 12's second round, by the rule in
#: bench/results/registration_coarse_regulariser_predeclared.md (validation pairs 20000-20003,
#: bench/results/registration_mni_1.5mm_validation_coarse_reg.json): ANTs SyN 0.840; 25 steps
#: working / coarse AAL Dice 0.8608 / 0.8611 in 3.14 / 2.93 s; 20 steps 0.8496 / 0.8495 (under
#: ANTs + 0.01).
REFINE_REGULARISERS = ("working", "coarse")
REFINE_REGULARISER_DEFAULT = "coarse"

#: The Adam step size of the working-grid steps, working-grid voxels (the ``--refine-fine`` steps
#: keep regseg.engines.refine.REFINE_LR, 0.05). 0.1 since session 12's fourth round, by the rule
#: in bench/results/registration_step_size_predeclared.md (validation pairs 20000-20003,
#: bench/results/registration_mni_1.5mm_validation_step_size.json): ANTs SyN 0.840; 25 steps at
#: 0.05 (the default then) 0.861 in 2.23 s; 15 steps at 0.1: 0.863 in 1.97 s, the cheapest to pass
#: (20 / 25 steps at 0.1: 0.871 / 0.875; at 0.07: 0.864 / 0.871; 15 at 0.07: 0.851, under the
#: floor). 0.15 since session 13's sixth round, by the same rule
#: (bench/results/registration_steps_s13_predeclared.md; same pairs,
#: bench/results/registration_mni_1.5mm_validation_steps_s13.json): ANTs SyN 0.840; 15 steps at
#: 0.1 (the default then) 0.863 in 1.90 s; 12 steps at 0.15: 0.864 in 1.65 s, the cheapest to pass
#: (10 at 0.15: 0.858 and 12 at 0.1: 0.854, under the floor; 15 at 0.15: 0.870 in 1.83 s). The step
#: count that goes with it, 12, is regseg.register_options.REFINE_DEFAULT.
REFINE_LR_DEFAULT = 0.15
