"""Triton kernels for hvfm's fused path, importable on their own (no dependency on hvfm).

Planned public API (flash-attn varlen conventions: packed (total, heads, head_dim) tensors, int32
cu_seqlens of shape (batch+1,), Python-int max_seqlen):
    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    patch_embed_gather(pixels, keep_idx, cu_seqlens, weight, bias, pos_spatial, pos_temporal)
Not implemented yet: this package holds no kernels so far, and hvfm uses its torch backends.
"""
__all__: list[str] = []
