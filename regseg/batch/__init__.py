"""Batch jobs over a manifest of cases, sharded over torchrun ranks and resumable (``regseg
batch``): :mod:`.manifest` reads and checks the cases, :mod:`.shard` says which a rank runs,
:mod:`.jobs` what each job does, :mod:`.runner` runs one rank, :mod:`.cli` the command line."""
