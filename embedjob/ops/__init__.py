"""Long-run operations built on runs: refresh (nightly re-embedding of what changed),
compact (fragments and old versions), plan (size a job from a sample)."""
