import pytest
import torch

from vlm.model.attention import Attention


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(32, 4).eval()


def test_fused_and_explicit_agree_for_causal_self_attention(attn):
    x = torch.randn(3, 7, 32)
    k, v = attn.keys_values(x)
    fused, none = attn(x, k, v, is_causal=True)
    explicit, weights = attn(x, k, v, is_causal=True, need_weights=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 4, 7, 7)
    assert torch.all(weights.triu(diagonal=1) == 0)  # no query sees the future


def test_fused_and_explicit_agree_for_cross_attention_with_mask(attn):
    x, image = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    k, v = attn.keys_values(image)
    mask = torch.rand(2, 1, 5, 9) > 0.3
    mask[..., 0] = True  # every query sees something
    fused, _ = attn(x, k, v, mask=mask)
    explicit, weights = attn(x, k, v, mask=mask, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert torch.all(weights.masked_select(~mask.expand_as(weights)) == 0)


def test_attention_rows_sum_to_one_over_patches(attn):
    x, image = torch.randn(2, 6, 32), torch.randn(2, 16, 32)
    _, weights = attn(x, *attn.keys_values(image), need_weights=True)
    assert weights.shape == (2, 4, 6, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))


def test_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(30, 4)
