"""Workflows: each owns one job end to end (training, inference, evaluation, benchmarks, the demo).

They are built from the leaves in `lib/` (the model) and `utils/` (I/O, data, metrics, devices, errors);
leaves never import pipelines.
"""
