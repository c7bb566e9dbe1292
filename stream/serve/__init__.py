"""``regseg-serve``: several scanner sessions in one process, sharing micro-batched engines."""
