"""Masked poolers: token embeddings (B, T, H) + attention mask (B, T) -> one vector per row (B, H).

All pool in float32 (a masked sum over thousands of fp16 tokens overflows), never write into their input, and
return a finite vector (zeros) for a row with no real token. They match sentence-transformers' Pooling modes
(`mean`, `cls`, `max`, `mean_sqrt_len_tokens`, `weightedmean`, `lasttoken`) on right-padded batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mask(mask: Tensor) -> Tensor:
    return mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)


def sum_pool(h: Tensor, mask: Tensor) -> Tensor:
    return (h.float() * _mask(mask)).sum(1)


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    return sum_pool(h, mask) / _mask(mask).sum(1).clamp(min=1e-9)


def mean_sqrt_len_pool(h: Tensor, mask: Tensor) -> Tensor:
    return sum_pool(h, mask) / _mask(mask).sum(1).clamp(min=1e-9).sqrt()


def weighted_mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """Position-weighted mean: token t (1-based) weighs t, so later tokens count more (SGPT)."""
    positions = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32).view(1, -1, 1)
    weights = _mask(mask) * positions
    return (h.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def max_pool(h: Tensor, mask: Tensor) -> Tensor:
    filled = h.float().masked_fill(_mask(mask) == 0, float("-inf"))
    pooled = filled.max(1).values
    return torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled)  # all-padding row -> 0


def cls_pool(h: Tensor, mask: Tensor) -> Tensor:
    """The first real token (index 0 on right-padded batches); zeros for an all-padding row."""
    first = mask.to(torch.int32).argmax(1)
    pooled = h[torch.arange(h.shape[0], device=h.device), first].float()
    return pooled * (mask.sum(1, keepdim=True) > 0)


def last_token_pool(h: Tensor, mask: Tensor) -> Tensor:
    last = (mask.sum(1) - 1).clamp(min=0)
    pooled = h[torch.arange(h.shape[0], device=h.device), last].float()
    return pooled * (mask.sum(1, keepdim=True) > 0)


POOL_FUNCTIONS = {
    "mean": mean_pool,
    "cls": cls_pool,
    "max": max_pool,
    "sum": sum_pool,
    "mean_sqrt_len": mean_sqrt_len_pool,
    "weighted_mean": weighted_mean_pool,
    "last_token": last_token_pool,
    "local_mean": mean_pool,  # over the mask with global-attention tokens removed, see Pooler.forward
}


class Pooler(nn.Module):
    """Pools token embeddings with one of POOL_FUNCTIONS; no weights."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in POOL_FUNCTIONS:
            raise ValueError(f"unknown pooler {mode!r}; choose one of {list(POOL_FUNCTIONS)}")
        self.mode = mode

    def forward(self, h: Tensor, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        if self.mode == "local_mean" and "global_attention_mask" in batch:
            mask = mask * (1 - batch["global_attention_mask"])
        return POOL_FUNCTIONS[self.mode](h, mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def l2_normalize(x: Tensor) -> Tensor:
    return F.normalize(x, p=2, dim=-1)  # eps keeps an all-zero (empty) row at zero
