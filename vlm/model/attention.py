"""One multi-head attention for causal self-attention and image cross-attention.

Two paths compute the same thing: the fused ``scaled_dot_product_attention`` kernel (training and
generation) and an explicit softmax path that also returns the attention weights (grounding, training with
a grounding loss). Generation computes weights only once decoding ends, from the inputs it kept, with the
explicit path's own ``queries`` and ``weights``.

Dimensions: B batch, H heads, T queries (text), S keys (text or image patches), D width, hd = D // H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention whose keys and values come from a separate source.

    For self-attention the source is the text itself; for cross-attention it is the image patch features,
    whose keys and values can be computed once (``keys_values``) and reused at every generation step.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, source_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(source_dim or dim, 2 * dim)  # the source may be wider or narrower than the queries
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Project a source (B, S, D or source_dim) to keys and values, each (B, H, S, hd)."""
        B, S, _ = source.shape
        kv = self.kv(source).view(B, S, 2, self.num_heads, self.head_dim)  # (B, S, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, S, hd)
        return k, v

    def queries(self, x: Tensor) -> Tensor:
        """Project queries x (B, T, D) to (B, H, T, hd)."""
        B, T, _ = x.shape
        return self.q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def weights(self, q: Tensor, k: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The explicit path's attention weights (B, H, T, S) of queries q (B, H, T, hd) over keys k (B, H, S, hd)."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if is_causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)

    def forward(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from queries x (B, T, D) to keys/values (B, H, S, hd).

        mask: boolean, broadcastable to (B, H, T, S), True where a query may attend. is_causal: a plain
        lower-triangular mask (T == S). Returns the output (B, T, D) and, when need_weights, the attention
        weights (B, H, T, S), whose rows sum to 1.
        """
        B, T, D = x.shape
        q = self.queries(x)  # (B, H, T, hd)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = self.weights(q, k, mask, is_causal)
            y = F.dropout(weights, dropout, self.training) @ v  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y), weights
