"""Leaves: building blocks (image I/O, atomic writes, DIS5K layout, data, losses, optimiser, metrics,
devices, errors, logging); they never import `pipelines`."""
