"""Validation during training: maxF and MAE of the P1 maps at GT size, computed as test.py writes them."""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipelines.inference import logits_to_map
from utils.data import EvalDataset, eval_collate
from utils.device import autocast
from utils.metrics import ValidationMetrics


@torch.no_grad()
def validate(model: nn.Module, dataset: EvalDataset, batch_size: int, num_workers: int, device: torch.device,
             amp: str, report_undecodable: Callable[[list[str]], None]) -> dict[str, float]:
    """maxF and MAE of `model` (left in eval mode) on `dataset`: P1 bilinear to GT size, sigmoid, min-max, 8 bits."""
    model.eval()
    metrics = ValidationMetrics()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=eval_collate)
    for images, masks, _, bad in tqdm(loader, desc="validation", leave=False, disable=None, file=sys.stderr):
        report_undecodable(bad)
        if images is None:
            continue
        with autocast(device, amp):
            logits = model.predict(images.to(device))
        for logit, mask in zip(logits, masks):
            metrics.step(logits_to_map(logit, mask.shape), mask)
    return metrics.get_results()
