"""The public faces: thin classes that hold a run model and an engine."""
