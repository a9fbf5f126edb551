"""The store: a run directory on disk, written atomically and read back with checks (the lock,
the checkpoint, the digests that tie a run to its data and config, RNG states, repair)."""
