"""DIS5K's fixed names: the splits test.py and eval.py visit, and the folder layouts a split may use."""
from __future__ import annotations

# Validation and the four test subsets, in the order the paper's tables list them.
EVAL_SPLITS: tuple[str, ...] = ("DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
TE_SUBSETS: tuple[str, ...] = ("DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
# The paper's overall test row: the mean of the four subsets' scores.
TE_MEAN_ROW = "DIS-TE (1-4)"
# (image folder, mask folder): DIS5K v1.0 first, then the release's train.py layout.
SPLIT_LAYOUTS: tuple[tuple[str, str], ...] = (("im", "gt"), ("Imgs", "GT"))
