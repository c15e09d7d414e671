"""DIS5K's fixed names: the splits test.py and eval.py visit, the folder layouts a split may use, and their lookup."""
from __future__ import annotations

from pathlib import Path

# Validation and the four test subsets, in the order the paper's tables list them.
EVAL_SPLITS: tuple[str, ...] = ("DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
TE_SUBSETS: tuple[str, ...] = ("DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
# The paper's overall test row: the mean of the four subsets' scores.
TE_MEAN_ROW = "DIS-TE (1-4)"
# (image folder, mask folder): DIS5K v1.0 first, then the release's train.py layout.
SPLIT_LAYOUTS: tuple[tuple[str, str], ...] = (("im", "gt"), ("Imgs", "GT"))
IMAGE_FOLDERS: tuple[str, ...] = tuple(image for image, _ in SPLIT_LAYOUTS)
GT_FOLDERS: tuple[str, ...] = tuple(gt for _, gt in SPLIT_LAYOUTS)


def split_folders(split: Path, images: bool = True, masks: bool = True) -> tuple[Path, Path] | None:
    """The (image, mask) folders of the first layout of `split` that has the ones asked for; None if none has."""
    for image_name, gt_name in SPLIT_LAYOUTS:
        wanted = [name for name, asked in ((image_name, images), (gt_name, masks)) if asked]
        if all((split / name).is_dir() for name in wanted):
            return split / image_name, split / gt_name
    return None


def expected_folders(images: bool = True, masks: bool = True) -> str:
    """The layouts `split_folders` accepts, for error messages (e.g. 'im/ + gt/ or Imgs/ + GT/')."""
    layouts = [" + ".join(f"{name}/" for name, asked in ((i, images), (g, masks)) if asked) for i, g in SPLIT_LAYOUTS]
    return " or ".join(layouts)
