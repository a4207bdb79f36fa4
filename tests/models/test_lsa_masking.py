"""LSA must exclude padded keys exactly, for every combination of the two pads.

The reference computes each window's attention over that window's real tokens only, with
explicit loops and a hand-written softmax, so it shares no code with the model.
"""
import pytest
import torch

from twins_mm.models.twins import LocallyGroupedAttention


def reference_lsa(attn: LocallyGroupedAttention, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    ws, heads = attn.window_size, attn.num_heads
    d = C // heads
    qkv = attn.qkv(x)  # (B, H, W, 3C)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    for b in range(B):
        for r0 in range(0, H, ws):
            for c0 in range(0, W, ws):
                win = qkv[b, r0:r0 + ws, c0:c0 + ws].reshape(-1, 3 * C)  # real tokens only
                q, k, v = win.split(C, dim=-1)
                res = []
                for h in range(heads):
                    qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
                    logits = qh @ kh.T * d ** -0.5
                    weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
                    weights = weights / weights.sum(-1, keepdim=True)
                    res.append(weights @ vh)
                rows, cols = min(ws, H - r0), min(ws, W - c0)
                out[b, r0:r0 + rows, c0:c0 + cols] = torch.cat(res, -1).reshape(rows, cols, C)
    return attn.proj(out)


@pytest.mark.parametrize('hw', [
    (14, 16),  # pad_b = 0, pad_r > 0: the official/mmseg mask is inert here
    (16, 14),  # pad_r = 0, pad_b > 0
    (15, 16),  # both pads > 0
    (14, 21),  # no padding
    (3, 5),    # smaller than one window
])
def test_lsa_equals_per_window_attention_over_valid_tokens(hw):
    torch.manual_seed(0)
    attn = LocallyGroupedAttention(dim=32, num_heads=2, window_size=7).eval()
    with torch.no_grad():
        attn.qkv.bias.normal_(0, 1.0)  # a non-zero bias makes unmasked padding visible
        x = torch.randn(2, *hw, 32)
        torch.testing.assert_close(attn(x), reference_lsa(attn, x), rtol=1e-5, atol=1e-5)


def test_window_key_mask_flags_exactly_the_padding():
    mask = LocallyGroupedAttention.window_key_mask(14, 16, 7, torch.device('cpu'))
    assert mask.shape == (2 * 3, 1, 1, 49)
    assert int((~mask).sum()) == 14 * 21 - 14 * 16  # padded positions only
    full = LocallyGroupedAttention.window_key_mask(128, 128, 7, torch.device('cpu'))
    assert int((~full).sum()) == 133 * 133 - 128 * 128
