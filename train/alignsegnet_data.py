"""AlignSegNet's frame sets: training (plain, or domain-randomised plus a plain share),
validation (randomised and plain with ``--randomise``) and the demo phantom's, cached per phantom
(:func:`regseg.train.data.cached_samples`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from regseg.train.data import (
    OpenScanner,
    SampleSet,
    cached_samples,
    open_randomised_scanner,
    open_randomised_stack_scanner,
    open_restyled_scanner,
)

DEMO_SEED = 0  # the phantom `regseg-stream --demo` shows: never trained on, reported apart


def frame_sets(cache_dir: str | Path | None, train_seeds: list[int], val_seeds: list[int],
              samples: int, val_frames: int, open_scanner: OpenScanner, randomise: bool,
              plain_fraction: float, data_args: dict[str, Any], mri_stacks: bool = False,
              restyled_fraction: float = 0.0
              ) -> tuple[SampleSet, SampleSet, SampleSet | None, SampleSet, int]:
    """The training, validation, plain validation (``--randomise`` only) and demo frames, and
    how many of the training frames (the last ones) are restyled.

    With ``restyled_fraction`` > 0 (``--randomise`` only) that share of the training frames is
    randomised cases re-rendered in a style drawn per case (:mod:`regseg.sim.restyle`), drawn
    with the data seed + 1 so their cases and poses are not the randomised frames' own.
    """
    train_phantoms = len(train_seeds)
    plain_val_set = None
    restyled_frames = 0
    open_randomised = open_randomised_stack_scanner if mri_stacks else open_randomised_scanner
    if randomise:
        n_plain = int(round(samples * plain_fraction))
        n_restyled = int(round(samples * restyled_fraction))
        plain_seeds = train_seeds[:max(1, min(len(train_seeds), 16))] if n_plain else []
        parts = [cached_samples(cache_dir, train_seeds,
                                math.ceil((samples - n_plain - n_restyled) / train_phantoms),
                                desc="randomised train frames",
                                open_scanner=open_randomised, **data_args)]
        if plain_seeds:
            parts.append(cached_samples(cache_dir, plain_seeds,
                                        math.ceil(n_plain / len(plain_seeds)),
                                        desc="plain train frames", open_scanner=open_scanner,
                                        **data_args))
        if n_restyled:  # last, so the training loop knows them by index
            parts.append(cached_samples(cache_dir, train_seeds,
                                        math.ceil(n_restyled / train_phantoms),
                                        desc="restyled train frames",
                                        open_scanner=open_restyled_scanner,
                                        **{**data_args, "seed": data_args["seed"] + 1}))
            restyled_frames = len(parts[-1])
        train_set = SampleSet.concat(parts)
        val_set = cached_samples(cache_dir, val_seeds, val_frames, desc="randomised val frames",
                                 open_scanner=open_randomised, **data_args)
        plain_val_set = cached_samples(cache_dir, val_seeds, val_frames, desc="val frames",
                                       open_scanner=open_scanner, **data_args)
    else:
        train_set = cached_samples(cache_dir, train_seeds, math.ceil(samples / train_phantoms),
                                   desc="train frames", open_scanner=open_scanner, **data_args)
        val_set = cached_samples(cache_dir, val_seeds, val_frames, desc="val frames",
                                 open_scanner=open_scanner, **data_args)
    demo_set = cached_samples(cache_dir, [DEMO_SEED], val_frames, desc="demo frames",
                              open_scanner=open_scanner, **data_args)
    return train_set, val_set, plain_val_set, demo_set, restyled_frames
