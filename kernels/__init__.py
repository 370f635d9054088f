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

    autotune_report(reset=False) -> dict, format_autotune_report(report) -> str
        what the first call of each (kernel, autotune key) of this process cost (compiling, and
        benchmarking the candidates) and whether its config came from the on-disk autotune cache
        (`$HVFM_AUTOTUNE_CACHE`, default `$TRITON_CACHE_DIR/hvfm_autotune`; see kernels._autotune).
    attention_class(max_seqlen_q, max_seqlen_k) -> int
        the autotune shape class of an attention call (video self-attention, fusion cross, ...).

Tiles: Hopper (sm_90) has its own configs, every other GPU the sm_80 ones (kernels._config);
`python -m kernels._compile_check` compiles them for both without a GPU.

`kernels.reference` holds pure-torch versions of both kernels. Without a GPU, set
TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors (slow).
No wrapper reads a device value on the host (no sync).
"""
from ._autotune import autotune_report
from ._autotune import format_report as format_autotune_report
from ._config import attention_class
from .attention import varlen_attention
from .patch_embed import patch_embed_gather, sample_keep_idx

__all__ = ["varlen_attention", "patch_embed_gather", "sample_keep_idx", "autotune_report",
           "format_autotune_report", "attention_class"]
