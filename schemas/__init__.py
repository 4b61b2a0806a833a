"""Declarations of every artifact and of the config, shared by writers, readers and tests."""
