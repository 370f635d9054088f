"""VideoLanguageModel: CLIP-initialised video + text towers, a fusion encoder, VTC + VTM + MLM.

Host syncs: pass the batch as the loader gives it (CPU tensors). Lengths, keep counts, caption
keys and MLM positions are then computed on the host for free and only host->device copies
happen. The one remaining device->host sync per step sizes the VTM pass (which hard negatives
were drawn decides how many tokens are gathered); see `losses.host_pairs`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .attention import concat_sequences, gather_sequences, get_backend, to_device
from .fusion import FusionEncoder
from .losses import (caption_keys, host_pairs, mlm_loss, sample_hard_negatives, swap_loss,
                     vtc_loss, vtm_loss)
from .text import TextEncoder, host_lengths, packed_index
from .video import Keep, VideoEncoder

DEFAULT_WEIGHTS = {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "swap": 0.0}


def reverse_count(fraction, batch: int) -> int:
    """Clips of a batch of `batch` encoded backwards for a reverse fraction (True = 1, False = 0)."""
    f = float(fraction or 0.0)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"reverse-negative fraction {f} must be in [0, 1]")
    return int(np.ceil(f * batch - 1e-9))


class VideoLanguageModel(nn.Module):
    def __init__(self, video: VideoEncoder, text: TextEncoder, fusion: FusionEncoder,
                 logit_scale: float):
        super().__init__()
        self.video, self.text, self.fusion = video, text, fusion
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views.
        self.logit_scale = nn.Parameter(torch.tensor([float(logit_scale)]))

    @classmethod
    def from_clip(cls, clip_model, tokenizer, fusion_layers: int = 2, fusion_width=None,
                  fusion_heads=None, attn="sdpa", max_frames: int = 16, checkpointing=False,
                  patch_embed=None, motion=False, vtm_token="last") -> "VideoLanguageModel":
        """Inflate a transformers CLIPModel. `patch_embed` None = the attention backend's default
        (`triton` when Triton runs, `conv` for sdpa, else `gather`; see video.default_patch_embed).
        `motion`: the zero-initialised motion channel (see video.VideoEmbeddings); `vtm_token`:
        the fusion token the VTM head reads, "last" (the caption's EOT) or "first" (BOS)."""
        vocab = clip_model.text_model.embeddings.token_embedding.num_embeddings
        if tokenizer.mask_token_id is None or len(tokenizer) > vocab:
            raise ValueError(f"tokenizer needs a mask token and at most {vocab} tokens "
                             f"(has {len(tokenizer)}); call hvfm.model.add_mask_token first")
        get_backend(attn)  # validate the name early (warns once on fallback)
        video = VideoEncoder.from_clip(clip_model, max_frames, attn=attn, checkpointing=checkpointing,
                                       patch_embed=patch_embed, motion=motion)
        text = TextEncoder.from_clip(clip_model, attn=attn, checkpointing=checkpointing)
        fusion = FusionEncoder.from_text(text, video.post_layernorm.weight.shape[0], fusion_layers,
                                         fusion_width, fusion_heads, attn=attn,
                                         checkpointing=checkpointing, vtm_token=vtm_token)
        return cls(video, text, fusion, clip_model.logit_scale.item())

    @property
    def device(self):
        return self.logit_scale.device

    def set_attention(self, backend: str) -> None:
        """Switch every attention in the model to `backend`."""
        get_backend(backend)
        self.video.attn = self.text.attn = self.fusion.attn = backend

    # -------------------------------------------------------------------------- retrieval API

    def encode_video(self, pixels, num_frames, drop_ratio=None, rng=None):
        """L2-normalised (B, P) video embeddings; all patches unless `drop_ratio` is given."""
        out = self.video(pixels.to(self.device), num_frames, drop_ratio, rng)
        return nn.functional.normalize(out.embeds, dim=-1)

    def encode_text(self, input_ids, attention_mask):
        """L2-normalised (B, P) caption embeddings."""
        out = self.text(input_ids.to(self.device), host_lengths(attention_mask))
        return nn.functional.normalize(out.embeds, dim=-1)

    def vtm_score(self, pixels, num_frames, input_ids, attention_mask, drop_ratio=None, rng=None):
        """Match probability (B,) of the aligned pairs (clip i, caption i), for re-ranking."""
        v = self.video(pixels.to(self.device), num_frames, drop_ratio, rng)
        t = self.text(input_ids.to(self.device), host_lengths(attention_mask))
        h = self.fusion(t.tokens, t.varlen, v.tokens, v.varlen)
        return self.fusion.vtm_logits(h, t.varlen).softmax(-1)[:, 1]

    # -------------------------------------------------------------------------- training

    def forward(self, batch: dict, drop_ratio=0.75, rng=None, reverse_negatives=False,
                loss_weights=None, generator=None, vtm_hardness=1.0) -> dict:
        """Losses on one batch; `rng` (numpy) draws keep counts, `generator` the device choices.

        `loss_weights`: dict with keys vtc/vtm/mlm/swap or a (vtc, vtm, mlm) triple; default
        1:1:1 and swap 0. A swap weight > 0 needs the batch's swapped captions (a loader built
        with swap=True): one more text-tower pass on them, see `losses.swap_loss`.
        `reverse_negatives`: the fraction of the batch (True: all) whose clips are also encoded
        played backwards, each an extra hard negative of its own caption in VTC and VTM.
        `vtm_hardness`: VTM negatives drawn with p ~ softmax(hardness * VTC logits).
        Returns loss, vtc, vtm, mlm, swap (detached) and token counts video_tokens (kept + CLS of the
        main pass) and text_tokens.
        """
        if loss_weights is not None and not isinstance(loss_weights, dict):
            loss_weights = dict(zip(("vtc", "vtm", "mlm"), loss_weights))
        w = {**DEFAULT_WEIGHTS, **(loss_weights or {})}
        dev = self.device
        lengths = host_lengths(batch["attention_mask"])
        keys = to_device(caption_keys(batch["input_ids"], lengths), dev)
        ids = batch["input_ids"].to(dev, non_blocking=True)
        mlm_ids = batch["mlm_input_ids"].to(dev, non_blocking=True)
        pixels = batch["pixels"].to(dev, non_blocking=True)

        v = self.video(pixels, batch["num_frames"], drop_ratio, rng, generator=generator)
        t = self.text(ids, lengths)
        rev = None
        n_rev = reverse_count(reverse_negatives, len(lengths))
        if n_rev:  # the first n_rev clips (a shuffled batch: a random subset), same patches
            k = v.keep
            total = int(k.counts[:n_rev].sum())
            keep = Keep(k.counts[:n_rev], k.keep_idx[:total], k.rows[:total])
            rev = self.video(pixels[:n_rev], np.asarray(batch["num_frames"])[:n_rev], keep=keep,
                             reverse=True)
        vtc, sim = vtc_loss(t.embeds, v.embeds, self.logit_scale, keys,
                            rev.embeds if rev is not None else None)

        zero = vtc.new_zeros(())
        vtm = self._vtm(t, v, rev, sim * vtm_hardness, keys, generator) if w["vtm"] else zero
        mlm = self._mlm(batch, mlm_ids, lengths, v) if w["mlm"] else zero
        swap = self._swap(batch, t, v) if w["swap"] else zero
        loss = w["vtc"] * vtc + w["vtm"] * vtm + w["mlm"] * mlm
        if w["swap"]:
            loss = loss + w["swap"] * swap
        return dict(loss=loss, vtc=vtc.detach(), vtm=vtm.detach(), mlm=mlm.detach(),
                    swap=swap.detach(),
                    video_tokens=v.varlen.total, text_tokens=int(lengths.sum()))

    def _vtm(self, t, v, rev, sim, keys, generator):
        """Positives, a hard-negative video per text, a hard-negative text per video (+ reversed)."""
        B = sim.shape[0]
        same = keys[:, None] == keys[None, :]
        ti, vi, labels = host_pairs(*sample_hard_negatives(sim, same, generator), B,
                                    0 if rev is None else len(rev.embeds))
        pool, pool_s = (v.tokens, v.varlen) if rev is None else \
            concat_sequences(v.tokens, v.varlen, rev.tokens, rev.varlen)
        tx, ts = gather_sequences(t.tokens, t.varlen, ti)
        # each clip's K/V once, gathered per pair (a clip is in ~3 pairs: positive + negatives)
        h = self.fusion(tx, ts, pool, pool_s, video_index=vi)
        return vtm_loss(self.fusion.vtm_logits(h, ts), to_device(labels, self.device))

    def _swap(self, batch, t, v):
        """The caption-swap term: the swapped captions through the text tower (always one pass,
        whatever the batch holds: every rank runs the same ZeRO-3 gathers), then `swap_loss`."""
        if "swap_input_ids" not in batch:
            raise ValueError("a swap weight > 0 needs the batch's swapped captions: build the "
                             "loader with swap=True (the trainer does for --swap-weight > 0)")
        dev = self.device
        s = self.text(batch["swap_input_ids"].to(dev, non_blocking=True),
                      host_lengths(batch["swap_attention_mask"]))
        index = to_device(batch["swap_index"], dev)
        return swap_loss(t.embeds, v.embeds, s.embeds, index, self.logit_scale)

    def _mlm(self, batch, mlm_ids, lengths, v):
        """Masked caption -> text tower -> fusion with its own clip -> tied decoder, CE on masks."""
        dev = self.device
        flat, _ = packed_index(lengths, mlm_ids.shape[1])
        lab = batch["mlm_labels"].detach().cpu().reshape(-1).numpy()[flat]
        where = np.nonzero(lab != -100)[0]
        m = self.text(mlm_ids, lengths)
        hm = self.fusion(m.tokens, m.varlen, v.tokens, v.varlen)
        logits = self.fusion.mlm_head(hm[to_device(where, dev)])
        return mlm_loss(logits, to_device(lab[where], dev))
