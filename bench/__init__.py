"""Benchmarks of the data path and the trainer: `python -m bench [--quick] [--device cuda]`."""
