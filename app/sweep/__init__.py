"""`python -m app sweep`: many runs (seeds x grid points) as ordinary run folders under one folder.

plan.py: which runs, their configs, the sweep folder; status.py: what state a run is in and the command
that continues it; runner.py: running them here, K per device; summary.py: the table of mean and
spread; cluster.py: the same runs as commands and a SLURM array for a scheduler elsewhere; command.py:
the command line's body.
"""
