"""Run models: which run an event belongs to, and the rules for experiments and runs."""
