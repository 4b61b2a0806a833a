"""Attend-and-segment pipeline stages: importable computations called by the Snakemake rules."""
