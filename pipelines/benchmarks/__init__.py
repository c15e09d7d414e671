"""The measurements behind benchmark.py: model speed and memory, data loading, evaluation speed."""
