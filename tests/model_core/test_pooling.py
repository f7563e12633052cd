"""Poolers against hand-computed references: masking, all-padding rows, float32 pooling of half-precision input."""
from __future__ import annotations

import pytest
import torch

from model_core import POOL_FUNCTIONS, Pooler
from model_core.pooling import l2_normalize

H = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]],     # row 0: 2 real tokens, 1 pad
                  [[-1.0, 0.5], [2.0, 2.0], [5.0, -6.0]],          # row 1: 3 real tokens
                  [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]]])           # row 2: all padding
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])

EXPECTED = {
    "sum": [[4.0, -2.0], [6.0, -3.5], [0.0, 0.0]],
    "mean": [[2.0, -1.0], [2.0, -3.5 / 3], [0.0, 0.0]],
    "mean_sqrt_len": [[4 / 2**0.5, -2 / 2**0.5], [6 / 3**0.5, -3.5 / 3**0.5], [0.0, 0.0]],
    "weighted_mean": [[(1 + 6) / 3, (2 - 8) / 3], [(-1 + 4 + 15) / 6, (0.5 + 4 - 18) / 6], [0.0, 0.0]],
    "max": [[3.0, 2.0], [5.0, 2.0], [0.0, 0.0]],
    "cls": [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]],
    "last_token": [[3.0, -4.0], [5.0, -6.0], [0.0, 0.0]],
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_pooler_matches_reference_and_ignores_padding(mode):
    out = Pooler(mode)(H, {"attention_mask": MASK})
    torch.testing.assert_close(out, torch.tensor(EXPECTED[mode]))


def test_local_mean_excludes_global_attention_tokens():
    global_mask = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    out = Pooler("local_mean")(H, {"attention_mask": MASK, "global_attention_mask": global_mask})
    torch.testing.assert_close(out, torch.tensor([[3.0, -4.0], [3.5, -2.0], [0.0, 0.0]]))


@pytest.mark.parametrize("mode", sorted(POOL_FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_pools_in_float32_without_overflow(mode, dtype):
    # 4096 tokens of 60000 each: the fp16 sum (2.4e8) would overflow at 65504.
    h = torch.full((1, 4096, 4), 60000.0).to(dtype)
    out = Pooler(mode)(h, {"attention_mask": torch.ones(1, 4096, dtype=torch.long)})
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_poolers_do_not_modify_their_input():
    h = H.clone()
    for mode in POOL_FUNCTIONS:
        Pooler(mode)(h, {"attention_mask": MASK, "global_attention_mask": torch.zeros_like(MASK)})
    assert torch.equal(h, H)


def test_normalize_keeps_an_empty_row_at_zero():
    out = l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_unknown_pooler_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown pooler 'avg'"):
        Pooler("avg")
