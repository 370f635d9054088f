"""The optimizer's parameter groups and the LR schedule of the trainer."""
from __future__ import annotations

import math

TIME_PARAMS = ("video.embeddings.temporal_embedding", "video.embeddings.motion_weight")
FRESH = ()
FRESH_FUSION = ("cross_norm", "cross_attn", "video_in", "text_in", "vtm_head", "mlm_head")


def param_groups(model, weight_decay, lr, temporal_lr_mult=1.0, fresh_lr_mult=1.0):
    """AdamW groups: no decay for biases, norms, embeddings and the temperature. The parameters
    of time (temporal embedding, motion channel: new and zero-initialised) learn at
    `lr * temporal_lr_mult`; the fusion encoder's fresh layers (cross-attention, input maps,
    heads: randomly initialised, unlike its blocks copied from the text tower) at
    `lr * fresh_lr_mult`; the rest (CLIP's towers) at `lr`."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in TIME_PARAMS:
            key = ("time", False)
        else:
            fresh = name in FRESH or (name.startswith("fusion.") and
                                      any(f".{k}" in f".{name}" for k in FRESH_FUSION))
            decay = not (p.ndim < 2 or "embedding" in name or "logit_scale" in name)
            key = ("fresh" if fresh else "base", decay)
        groups.setdefault(key, []).append(p)
    mult = {"base": 1.0, "fresh": fresh_lr_mult, "time": temporal_lr_mult}
    out = []
    for (kind, decay), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if mult[kind] != 1.0:
            group["lr"] = lr * mult[kind]
        out.append(group)
    return out


def lr_lambda(total_steps, warmup):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f

