"""Tiny random checkpoints of every family, built locally (no hub access) and shaped like the hub's: the test
fixtures, and the demo's default models (`default_model`)."""
