"""The consolidated export `OUTPUT_DIR/final`: written here, read by hvfm/load.py (which loads
every kind of checkpoint, and names the weights this format writes).

Export folder (format `hvfm-export-v2`):

- `config.json` + `model.safetensors`: a transformers `CLIPModel` (its text vocabulary grown by
  the mask token when one was added), so `CLIPModel.from_pretrained(final)` gives the
  post-pretrained vision and text towers, projections and `logit_scale`. The video model's
  temporal embedding of frame 0 is folded into the patch position embedding, so the image
  model's features equal hvfm's features of a one-frame clip.
- `hvfm_model.safetensors`: what CLIP has no place for -- the temporal embedding, the fusion
  encoder with its VTM and MLM heads -- and the unfolded position embedding (hvfm's own value).
  (In v1 this file held every weight; `hvfm.json`'s format says which.)
- `hvfm.json`: the format, how the model was built (`VideoLanguageModel.from_clip` keyword
  arguments) and where the weights are; the tokenizer files.

`hvfm.load.load_export` reads v2 and the earlier v1.

    python -m hvfm.export --checkpoint SRC --out DIR [--tag TAG] [--merge-with-clip A [--clip DIR]]

writes an export from a DeepSpeed checkpoint folder (any ZeRO stage, consolidated to fp32), an
older export, or a run folder (any kind `hvfm.load.load_any` reads), optionally merged with the
original CLIP (see `hvfm.load.merge_with_clip`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data.errors import DataError  # noqa: E402
from hvfm.load import (CLIP_WEIGHTS, EXTRA_WEIGHTS, FORMAT, POSITION, TEMPORAL, TIED,  # noqa: E402
                       load_any, merge_with_clip_dir, to_clip_key)


def split_state(state):
    """(CLIP tensors under transformers names, extra tensors under hvfm names) of an hvfm state.

    Frame 0's temporal embedding is folded into CLIP's patch position embedding; the extra
    tensors keep hvfm's own position embedding so a round trip is exact."""
    clip, extra = {}, {}
    for name, t in state.items():
        t = t.detach().to("cpu", torch.float32).contiguous().clone()
        if name in TIED:
            continue
        key = to_clip_key(name)
        if key is None:
            extra[name] = t
        elif name == "logit_scale":
            clip[key] = t.reshape(())
        else:
            clip[key] = t
    if TEMPORAL in state and POSITION in state:
        pos = state[POSITION].detach().to("cpu", torch.float32)
        folded = pos.clone()
        folded[1:] += state[TEMPORAL].detach().to("cpu", torch.float32)[0]
        clip[to_clip_key(POSITION)] = folded.contiguous()
        extra[POSITION] = pos.contiguous().clone()
    return clip, extra


def _clip_config_for(clip_config, state):
    """A copy of the CLIP config whose shapes match the state (vocab grown by the mask token)."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_dict(clip_config.to_dict())
    emb = state.get("text.token_embedding.weight")
    if emb is not None:
        config.text_config.vocab_size = int(emb.shape[0])
    config.architectures = ["CLIPModel"]
    return config


def save_export(folder, state_dict, clip_config, tokenizer, build, meta=None):
    """Write the export atomically (temporary sibling, then rename). `build` holds the keyword
    arguments of `VideoLanguageModel.from_clip` other than the CLIP model and tokenizer; `meta`
    (optional) is recorded in hvfm.json (e.g. the source checkpoint, a merge)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    clip, extra = split_state(state_dict)
    config = _clip_config_for(clip_config, state_dict)
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    save_file(clip, str(tmp / CLIP_WEIGHTS), metadata={"format": "pt"})
    save_file(extra, str(tmp / EXTRA_WEIGHTS), metadata={"format": "pt"})
    info = {"format": FORMAT, "build": build,
            "weights": {"clip": CLIP_WEIGHTS, "extra": EXTRA_WEIGHTS},
            "temporal_frame0_folded_into_clip_positions": True}
    if meta:
        info["meta"] = meta
    (tmp / "hvfm.json").write_text(json.dumps(info, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)
    return folder


def save_clip_folder(folder, state_dict, clip_config, tokenizer):
    """Write a plain HF `CLIPModel` folder (config, model.safetensors, tokenizer) from an hvfm
    state: the image CLIP of stage 1, loadable by `--clip` and by `CLIPModel.from_pretrained`.
    Atomic like `save_export`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    clip, _ = split_state(state_dict)
    _clip_config_for(clip_config, state_dict).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    save_file(clip, str(tmp / CLIP_WEIGHTS), metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvfm.export", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="DeepSpeed checkpoint folder (or a tag folder), an export, or a run folder")
    ap.add_argument("--out", required=True, help="export folder to write")
    ap.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the 'latest' file's)")
    ap.add_argument("--merge-with-clip", type=float, default=None, metavar="ALPHA",
                    help="theta = ALPHA*theta_clip + (1-ALPHA)*theta_post for CLIP's parameters")
    ap.add_argument("--clip", help="original CLIP folder for --merge-with-clip "
                                   "(default: the run's --clip, else OUTPUT_DIR/init_clip)")
    args = ap.parse_args(argv)
    try:
        model, tokenizer, info = load_any(args.checkpoint, tag=args.tag)
        if info["kind"] == "clip":
            raise DataError(f"{args.checkpoint}: a plain CLIP folder has nothing to export")
        meta = {"source": info["source"]}
        if args.merge_with_clip is not None:
            clip_dir, n = merge_with_clip_dir(model, info, args.merge_with_clip, args.clip)
            meta["merge"] = {"alpha": args.merge_with_clip, "clip": str(clip_dir), "tensors": n}
        build = {k: v for k, v in info["build"].items() if k != "checkpointing"}
        save_export(args.out, model.state_dict(), info["clip_config"], tokenizer, build, meta)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"export": str(args.out), "format": FORMAT, **meta}))


if __name__ == "__main__":
    main()
