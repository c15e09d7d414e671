"""Logging set-up shared by the scripts: INFO on the main process, warnings only elsewhere."""
from __future__ import annotations

import logging


def configure_logging(rank: int = 0, level: int = logging.INFO, fmt: str | None = None) -> None:
    """Log to stderr: `level` on rank 0, warnings and errors only on the other ranks (tagged with the rank)."""
    if fmt is None:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if rank:
        fmt = fmt.replace("%(levelname)s", f"[rank {rank}] %(levelname)s")
        level = logging.WARNING
    logging.basicConfig(level=level, format=fmt)  # keeps handlers already installed (e.g. by pytest)
    logging.getLogger().setLevel(level)
