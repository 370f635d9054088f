"""Triton kernels for hvfm's fused path, importable on their own (depend on torch and triton only).

    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     *, causal=False, softmax_scale=None) -> out
        flash-attn varlen conventions: packed (total, H, D) tensors, int32 cu_seqlens (B+1,),
        host-int max_seqlen (sizes the grid only). FlashAttention-2 forward/backward, fp32
        accumulation, fp32/fp16/bf16, head dim <= 128, bottom-right causal, zero-length sequences.
    patch_embed_gather(pixels, keep_idx, cu_seqlens, weight, bias, pos_spatial, pos_temporal)
        patch embedding of the kept patches read straight from (B, T, C, H, W) pixels, + bias +
        spatial and temporal position embeddings, in one launch.
    sample_keep_idx(counts, num_patches, max_patches, total=None, generator=None)
        device-side uniform choice of kept patches (sorted within each sample).

`kernels.reference` holds pure-torch versions of both kernels. Without a GPU, set
TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors (slow).
No wrapper reads a device value on the host (no sync).
"""
from .attention import varlen_attention
from .patch_embed import patch_embed_gather, sample_keep_idx

__all__ = ["varlen_attention", "patch_embed_gather", "sample_keep_idx"]
