"""Captions and tokens: cleaning, the tokenizer folder, batch tokenisation and MLM masking.

There is one loading path for tokenizers: an HF tokenizer folder (`load_tokenizer`). A real CLIP
folder's tokenizer loads as it is; for the built-in default, `build_tokenizer` trains a small byte-level
BPE tokenizer on the training captions with the `tokenizers` library and saves it as such a folder.
CLIP has no mask token: `load_tokenizer` adds `<|mask|>` when missing (the model then grows its
token embedding by one row) and a pad token when missing.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import torch

from ..errors import DataError

BOS, EOS, PAD, MASK, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|mask|>", "<|unk|>"
MAX_LENGTH = 77  # CLIP's text context

_DROP = re.compile(r"[\"'()*#:;~,.!?\[\]{}<>|`^]")
_SPLIT = re.compile(r"[-/_\\]+")
_SPACES = re.compile(r"\s+")
_LEFT_RIGHT = re.compile(r"\b(left|right)(wards?)?\b")


def clean_caption(text, max_words=None):
    """Normalise a web caption: unescape HTML, lowercase, split on -/_, drop punctuation and
    repeated spaces, optionally keep the first `max_words` words."""
    text = html.unescape(text).lower()
    text = _SPLIT.sub(" ", text)
    text = _DROP.sub("", text)
    words = _SPACES.sub(" ", text).strip().split(" ")
    if max_words:
        words = words[:max_words]
    return " ".join(w for w in words if w)


def swap_left_right(text):
    """The caption of the horizontally mirrored video: 'left' <-> 'right' (whole words)."""
    return _LEFT_RIGHT.sub(lambda m: ("right" if m.group(1) == "left" else "left") + (m.group(2) or ""),
                           text)


_VERTICAL = {"top": "bottom", "bottom": "top", "up": "down", "down": "up", "above": "below",
             "below": "above", "upper": "lower", "lower": "upper", "upwards": "downwards",
             "downwards": "upwards"}
_TOP_BOTTOM = re.compile(r"\b(" + "|".join(_VERTICAL) + r")\b")


def swap_top_bottom(text):
    """The caption of the vertically mirrored image: top <-> bottom, up <-> down, above <->
    below, upper <-> lower (whole words)."""
    return _TOP_BOTTOM.sub(lambda m: _VERTICAL[m.group(1)], text)


def place_axes(text):
    """The axes a caption's place words name: "lr" (left/right), "tb" (top/bottom, up/down,
    above/below, upper/lower), both, or neither (an empty tuple). Mirroring an image along an
    axis its caption does not name leaves the caption true, so only these axes give a caption
    that the mirrored image does not match."""
    return tuple(axis for axis, pattern in (("lr", _LEFT_RIGHT), ("tb", _TOP_BOTTOM))
                 if pattern.search(text))


def build_tokenizer(captions, folder, vocab_size=1000):
    """Train a byte-level BPE tokenizer (lower-case; CLIP's and GPT-2's byte alphabet as the base,
    so any text encodes without an unknown token) on `captions` and save it as an HF tokenizer
    folder. Returns the loaded tokenizer. The vocabulary holds at least the 256 byte symbols and
    the 5 special tokens, whatever `vocab_size` asks for."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, MASK, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(captions, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 mask_token=MASK, unk_token=UNK, model_max_length=MAX_LENGTH)
    Path(folder).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    return load_tokenizer(folder)


def load_tokenizer(folder):
    """Load an HF tokenizer folder (offline); add mask and pad tokens when the folder has none."""
    folder = Path(folder)
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if not folder.is_dir() or not any((folder / n).exists() for n in names):
        raise DataError(f"{folder}: not a tokenizer folder (needs tokenizer.json, or vocab.json + "
                        f"merges.txt); save one with tokenizer.save_pretrained(DIR)")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        raise DataError(f"{folder}: tokenizer does not load ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": MASK})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": tok.eos_token or PAD})
    return tok


def tokenize(tokenizer, captions, max_length=MAX_LENGTH):
    """Right-padded ids, attention mask and special-tokens mask, int64 (B, L) with L the longest."""
    enc = tokenizer(list(captions), padding=True, truncation=True, max_length=max_length,
                    return_special_tokens_mask=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["special_tokens_mask"]


class MLMMasker:
    """BERT-style masking: each real, non-special token is chosen with probability `ratio`; a chosen
    token becomes the mask token 80% of the time, a random ordinary token 10%, itself 10%.
    Labels hold the original id at chosen positions and -100 everywhere else."""

    def __init__(self, tokenizer, ratio=0.5):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.mask_id = tokenizer.mask_token_id
        special = set(tokenizer.all_special_ids)
        self.ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def __call__(self, input_ids, attention_mask, special_mask, generator=None):
        eligible = (attention_mask == 1) & (special_mask == 0)
        u = torch.rand(input_ids.shape, generator=generator)
        chosen = eligible & (u < self.ratio)
        how = torch.rand(input_ids.shape, generator=generator)
        replace = torch.randint(len(self.ordinary), input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[chosen & (how < 0.8)] = self.mask_id
        random_pos = chosen & (how >= 0.8) & (how < 0.9)
        masked[random_pos] = self.ordinary[replace[random_pos]]
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        return masked, labels


def ensure_tokenizer(folder, ann, vocab_size=1000):
    """Load the tokenizer folder, or train one on the captions of `ann` (an Annotations) and save
    it there first (see `ensure_tokenizer_from`)."""
    return ensure_tokenizer_from(folder, lambda: list(ann.pair_caption), vocab_size)


def ensure_tokenizer_from(folder, captions, vocab_size=1000, marker=None):
    """Load the tokenizer folder, or train one on `captions()` and save it there first. Written to
    a temporary sibling and renamed, so a crash never leaves half a folder and concurrent ranks
    agree on one result. `marker` {"name", "text"}: a file written into the folder with it."""
    import os
    import shutil
    import uuid

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        build_tokenizer(captions(), tmp, vocab_size)
        if marker:
            (tmp / marker["name"]).write_text(marker["text"])
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)
