"""bench/registration.py's row names: the default settings unsuffixed, every other one named."""

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("registration")


def test_default_settings_have_the_plain_name(bench):
    from regseg.engines.affine_modes import (
        AFFINE_DEFAULT,
        REFINE_INT_STEPS_DEFAULT,
        REFINE_LR_DEFAULT,
        REFINE_MODE_DEFAULT,
        REFINE_REGULARISER_DEFAULT,
    )
    from regseg.register_options import REFINE_DEFAULT

    assert bench.default_row() == f"regseg_refine{REFINE_DEFAULT}"
    assert bench.regseg_row(AFFINE_DEFAULT, 25, refine_mode=REFINE_MODE_DEFAULT,
                            int_steps=REFINE_INT_STEPS_DEFAULT,
                            regulariser=REFINE_REGULARISER_DEFAULT,
                            lr=REFINE_LR_DEFAULT) == "regseg_refine25"


def test_non_default_settings_are_suffixed_in_a_fixed_order(bench):
    name = bench.regseg_row("optimise", 20, 10, refine_mode="fast", int_steps=7,
                            regulariser="working", lr=0.07)
    assert name == "regseg_refine20_fine10_fast_int7_regworking_lr0.07_optimise"
    assert bench.regseg_row("learned+optimise", 15, lr=0.05) == "regseg_refine15_lr0.05"
    # settings of the steps mean nothing without steps
    assert bench.regseg_row("learned+optimise", 0, lr=0.1, int_steps=3) == "regseg_refine0"
    assert bench.regseg_row("learned+optimise", 0, affine_only=True) == "regseg_affine"


def test_the_engine_refuses_a_step_size_that_is_not_positive():
    from regseg.engines.registration import RegistrationEngine

    with pytest.raises(ValueError, match="refine_lr 0"):
        RegistrationEngine("plcreg3d", refine_lr=0.0, affine_iterations=0)
