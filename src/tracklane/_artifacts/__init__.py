"""Artifacts: what a run stores as files, rendered from the user's objects (``kinds``)."""
