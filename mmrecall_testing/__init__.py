"""Fixtures shared by the tests and the benches: small data sets, configs and checkpoints."""
