"""Benchmarks of vit-2ssp against the seed recipe, the 2SSP paper recipe, Torch-Pruning and random.

Run all tables: ``python -m bench`` (``--smoke`` for the seconds-long CI version).
"""
