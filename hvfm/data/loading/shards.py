"""Training from tar shards (written by `python -m hvfm.data.prepare`) with the webdataset library.

`build_shard_loader(spec, tokenizer, ...)` gives a loader with the interface of `build_loader`'s
(`VideoTextLoader`: iterate for batches of the same format, `len`, `set_epoch`, `state_dict`,
skip counters), so the trainer's loop does not know which one it runs.

Spec: a folder (its `*.tar`, sorted) or a brace pattern (`shards/{000000..000099}.tar`). The
epoch's length comes from `index.json` beside the shards (written by prepare), else from reading
the tar member names once.

The stream of one rank (world ranks, W loader workers, W >= 1; workers 0 is one slot in the
training process) is split into W "slots"; slot L makes the rank's batches L, L + W, L + 2W, ...
(the DataLoader collects batches from its workers round-robin). Each slot reads its own shards:
per pass over the data the shard list is permuted with a generator seeded by (seed, epoch, pass)
and slot s = rank * W + L of the world * W slots takes every (world * W)-th shard from s; with fewer
shards than slots every slot reads all shards and keeps every (world * W)-th sample. Samples go
through a shuffle buffer (webdataset's algorithm; which sample leaves the buffer is drawn from
(seed, epoch, rank, L, samples taken so far), so the order is reproducible), then are decoded from
memory (`decode_sample`: an mp4 with --decoder, or pre-extracted images), cropped, flipped and tokenised exactly as the map-style dataset
does (same `VideoTransform`, `Collator`). An epoch is floor(samples / (world * batch)) batches on
every rank (ranks must step together); a slot whose shards run out before its share starts its
next pass (so with uneven shards a few samples repeat within an epoch, others wait for the next).

Resume: the loader state holds, per slot, how many samples it has taken from its buffer (`k`),
the raw position of its stream (`r`: samples pulled from the shards into the buffer) and which raw
samples sit in the buffer (`buf`). A resumed slot finds, from the per-shard sample counts of
`index.json` (`shard_counts`), the shard that holds raw sample r - 1, skips every shard before it
without opening it, reads that one shard from its start to r (read, not decoded), puts back the
buffered samples that came from it and continues from r. The first batch therefore costs at most
one shard's reading plus the buffer's usual refill, however far the epoch had gone.
What is exact and what is approximate:
  - exact (the batches of the uninterrupted run, bit for bit) when every sample in the buffer at
    the save came from the shard being read: always with --shuffle-buffer 0 or 1, and with a
    buffer when the shards are large against it;
  - otherwise the buffered samples that came from earlier shards (at most the buffer's size; with
    the default 1000 and shards of 1000, typically a few hundred) are skipped for the rest of this
    epoch (seen again the next epoch) and the order after the resume differs from the
    uninterrupted run's; no sample taken before the save is taken again in the same pass;
  - a shard whose content no longer matches its count in index.json (damaged after prepare wrote
    it) shifts positions only within that shard;
  - another world size or --workers: every rank resumes at the same share of the epoch
    (samples consumed, divided among the new slots), with the new slot layout's shards: some
    samples of the epoch are seen twice, others wait for the next epoch (a warning says so).

A sample's video is an mp4 (`NNN.mp4`) or pre-extracted frames (`NNN.f00.jpg`, `NNN.f01.jpg`, ...;
or .webp), as `prepare --format` wrote them: the same sampler picks frames from either
(`decode_sample`). Bad samples (undecodable bytes, no frames) are skipped: the next sample of the
stream takes the place, and the failure travels with the batch so the skip counters and bad-file
log work as for files (the "path" is `SHARD_URL:KEY`). With `--decode-timeout` every sample decodes
in a watchdog child (`decode.DecoderProcess`, request kind "sample"): a decode that hangs or
crashes is abandoned, skipped and counted (kinds "timeout", "crash") as for files.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .dataset import COUNTERS, Collator, VideoTextLoader, keyed_rng, worker_init
from ..decode import DecodeError, DecoderProcess, decode_with, decoder_order, resize_frames, take_frames
from ..errors import DataError
from ..text.tokens import MAX_LENGTH, clean_caption, swap_left_right
from ..transforms.device import draw_params

log = logging.getLogger("hvfm.data")
INDEX = "index.json"


# ----------------------------------------------------------------------------- shard lists

def expand_shards(spec):
    """The shard paths of `spec` (a folder of *.tar, a brace pattern, a glob or one file)."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise DataError(f"--train-shards {spec}: the folder holds no .tar shards; write them "
                            f"with python -m hvfm.data.prepare --out {spec}")
        return urls
    if not any(c in spec for c in "{*?[") and not os.path.exists(spec):
        raise DataError(f"--train-shards {spec}: no such folder or file; give the folder "
                        f"python -m hvfm.data.prepare wrote (--out) or a pattern like "
                        f"shards/{{000000..000099}}.tar")
    import braceexpand
    urls = [u for part in braceexpand.braceexpand(spec) for u in (sorted(glob.glob(part)) or [part])]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"--train-shards {spec}: {len(missing)} of {len(urls)} shard(s) missing, "
                        f"first {missing[0]}; check the pattern (e.g. shards/{{000000..000099}}.tar)")
    return urls


def shard_counts(urls):
    """Samples per shard: from index.json beside them (prepare's), else by reading the tars."""
    counts, indexes = {}, {}
    for u in urls:
        folder = os.path.dirname(os.path.abspath(u))
        if folder not in indexes:
            try:
                index = json.loads(Path(folder, INDEX).read_text())
                indexes[folder] = {s["name"]: s["samples"] for s in index["shards"]}
            except (OSError, ValueError, KeyError, TypeError):
                indexes[folder] = {}
        n = indexes[folder].get(os.path.basename(u))
        if n is None:
            from ..sources.prepare import count_samples
            try:
                n = count_samples(u)
            except Exception as e:  # noqa: BLE001 - tarfile errors of every kind
                raise DataError(f"{u}: not a readable tar shard ({type(e).__name__}: {e}); rewrite it "
                                f"with python -m hvfm.data.prepare") from None
        counts[u] = int(n)
    return counts


class ShardCaptions:
    """What the trainer needs of the shards' annotations before it builds the loader: `source`
    (for messages) and `pair_caption`, every caption (cleaned) for training a tokenizer on them.
    The captions are read lazily, and only then (the .txt members alone are kept): a run given
    --tokenizer or --clip never reads the shards for them."""

    def __init__(self, spec):
        self.source = str(spec)
        self.urls = expand_shards(spec)  # a bad spec fails here, at start, in one line
        self._captions = None

    @property
    def pair_caption(self):
        if self._captions is None:
            import webdataset as wds
            samples = wds.tarfile_to_samples(select_files=lambda name: name.endswith(".txt"))(
                iter([{"url": u} for u in self.urls]))
            self._captions = [clean_caption(c) for s in samples if "txt" in s for c in _captions(s)]
            if not self._captions:
                raise DataError(f"--train-shards {self.source}: no samples with a caption (.txt)")
        return self._captions

    def __len__(self):
        return len(self.pair_caption)

    def __repr__(self):
        return f"ShardCaptions({self.source!r}, shards={len(self.urls)})"


def shard_captions(spec):
    """The shards' captions, lazily (see `ShardCaptions`)."""
    return ShardCaptions(spec)


def _captions(sample):
    text = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else sample["txt"]
    return [line for line in (x.strip() for x in text.splitlines()) if line] or [""]


# ----------------------------------------------------------------------------- decoding bytes

FRAME_FORMATS = ("jpg", "webp")  # pre-extracted frames: NNNNNNNNN.f00.jpg, .f01.jpg, ...


def decode_bytes(data, num_frames, train=False, rng=None, short_side=None, decoder="auto", name="<bytes>"):
    """`decode_clip` for an mp4 held in memory: uint8 (T, H, W, 3), the same frame sampling and
    decoders; DecodeError(name, reason) for bytes that give no frame."""
    order = decoder_order(decoder)
    if train and rng is None:
        raise ValueError("training-mode sampling needs an rng (numpy Generator)")
    if not data:
        raise DecodeError(name, "empty video bytes")
    return decode_with(order, io.BytesIO(data), num_frames, train, rng, short_side, name)[0]


def decode_image(data):
    """One encoded frame (JPEG, WebP, PNG) as uint8 (H, W, 3), with Pillow (libjpeg-turbo: about
    as fast as torchvision.io.decode_jpeg on a CPU, and no extra dependency)."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def frame_members(sample):
    """The pre-extracted frames of a shard sample, in order: [bytes] of its fNN.jpg / fNN.webp
    members (empty when it has none)."""
    found = []
    for k, v in sample.items():
        stem, dot, ext = k.partition(".")
        if dot and ext in FRAME_FORMATS and stem[:1] == "f" and stem[1:].isdigit():
            found.append((int(stem[1:]), v))
    return [v for _, v in sorted(found)]


def video_of(sample):
    """What of a shard sample is decoded: {"mp4": bytes} or {"frames": [bytes, ...]} (the other
    members, caption and metadata, stay in the loader worker); None if it has neither."""
    if "mp4" in sample:
        return {"mp4": sample["mp4"]}
    frames = frame_members(sample)
    return {"frames": frames} if frames else None


def decode_sample(video, num_frames, train=False, rng=None, short_side=None, decoder="auto", name="<sample>"):
    """The sampled frames of a shard sample's video (`video_of`), uint8 (T, H, W, 3).

    mp4: `decode_bytes`. Pre-extracted frames: the stored frames are the clip's frames to sample
    from, with the same sampler as a file (`take_frames`: one random frame per equal segment in
    training), and only the chosen ones are decoded. DecodeError(name) when no frame decodes."""
    if "mp4" in video:
        return decode_bytes(video["mp4"], num_frames, train, rng, short_side, decoder, name)
    images = video["frames"]
    if train and rng is None:
        raise ValueError("training-mode sampling needs an rng (numpy Generator)")
    state = rng.bit_generator.state if rng is not None else None

    def get(idx):
        return np.stack([decode_image(images[i]) for i in idx]) if len(idx) else None
    try:
        frames = take_frames(get, len(images), num_frames, train, rng)
    except Exception as e:  # noqa: BLE001 - a damaged image is a bad sample
        if rng is not None:
            rng.bit_generator.state = state
        raise DecodeError(name, f"frames: {type(e).__name__}: {' '.join(str(e).split())[:120]}") from None
    if frames is None or len(frames) == 0:
        raise DecodeError(name, "no frames")
    return resize_frames(frames, short_side) if short_side else frames


def decode_sample_request(args, rng):
    """The watchdog child's decode of a shard sample (decode.WATCHDOG_TARGETS["sample"])."""
    video, num_frames, train, short_side, decoder, name = args
    return decode_sample(video, num_frames, train, rng, short_side, decoder, name)


# ----------------------------------------------------------------------------- dataset

class ShardDataset(IterableDataset):
    """Yields collated batches of one rank (see the module docstring). Set `epoch`, `start`
    (samples of this rank already consumed) and `raw` (per slot: raw samples taken) before
    iterating; the loader does."""

    def __init__(self, urls, counts, collate, batch_size, *, frames=8, size=224, rank=0, world_size=1,
                 workers=0, seed=0, shuffle_buffer=1000, decoder="auto", max_retries=10,
                 hflip=0.5, crop_scale=(0.5, 1.0), clean=clean_caption, decode_timeout=None):
        self.urls, self.counts, self.collate, self.batch_size = list(urls), counts, collate, batch_size
        self.frames, self.size, self.rank, self.world = frames, size, rank, world_size
        self.slots = max(workers, 1)
        self.seed, self.shuffle_buffer, self.decoder = seed, shuffle_buffer, decoder
        self.max_retries, self.clean = max_retries, clean
        self.hflip, self.crop_scale = hflip, crop_scale
        self.watchdog = DecoderProcess(decode_timeout) if decode_timeout else None
        self.total = sum(counts[u] for u in self.urls)
        self.batches_per_epoch = self.total // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"the shards hold {self.total} samples, fewer than one batch of "
                            f"{batch_size} for each of {world_size} rank(s); write more samples or "
                            f"lower the batch size")
        self.epoch, self.start, self.raw = 0, 0, None
        self.reads = 0  # raw samples read from the tars by this process (resume cost, tests)
        self.resume_stats = {}  # per slot L, of the last start: samples read to resume, restored, dropped

    def __len__(self):  # batches left in this epoch
        return max(0, self.batches_per_epoch - self.start // self.batch_size)

    def set_epoch(self, epoch, start=0, raw=None):
        self.epoch, self.start, self.raw = epoch, start, raw

    # -- the raw stream of one slot
    def _slot_urls(self, slot, p):
        order = keyed_rng(self.seed, self.epoch, p, 0x5A4D).permutation(len(self.urls))
        nslots = self.world * self.slots
        if len(self.urls) >= nslots:
            return [self.urls[i] for i in order[slot::nslots]], None
        return [self.urls[i] for i in order], (slot, nslots)

    def _pass(self, slot, p):
        """Pass p of a slot: its shards, the samples the slot keeps of each (from the counts) and
        the (slot, slots) of the every-nth rule (None: the slot keeps whole shards)."""
        urls, every = self._slot_urls(slot, p)
        if every is None:
            return urls, [self.counts[u] for u in urls], None
        kept, off = [], 0
        for u in urls:  # tar items off .. off + count - 1 of the pass; keep i % n == s
            c = self.counts[u]
            kept.append(_congruent(off + c, *every) - _congruent(off, *every))
            off += c
        if sum(kept) == 0:
            raise DataError(f"shards {self.urls[0]}...: slot {slot} found no samples in a pass")
        return urls, kept, every

    def pass_of(self, slot, i):
        """(p, r): the pass of `slot` that holds raw sample i and the raw index its first sample
        has, from the counts alone (nothing is read)."""
        r = 0
        for p in itertools.count():
            n = sum(self._pass(slot, p)[1])
            if r + n > i:
                return p, r
            r += n

    def shard_begin(self, slot, i):
        """The raw index (in this epoch's stream of `slot`) of the first sample of the shard that
        holds raw sample i: found from the counts alone, nothing is read."""
        p, r = self.pass_of(slot, i)
        for n in self._pass(slot, p)[1]:
            if r + n > i:
                return r
            r += n

    def _raw_stream(self, slot, start=0):
        """(raw index, sample) of a slot's stream from raw index `start`: the shards that end
        before it are skipped unopened (their counts say how many samples they hold); the shard
        that holds it is read from its start (the samples before `start` read, not yielded)."""
        import webdataset as wds
        first, r = self.pass_of(slot, start)
        for p in itertools.count(first):
            urls, kept, every = self._pass(slot, p)
            whole, got, off = r >= start, 0, 0
            for u, n in zip(urls, kept):
                c = self.counts[u]
                if r + n <= start:  # consumed: never opened
                    r, off = r + n, off + c
                    continue
                i = r
                # a shard damaged after prepare wrote it: warn, keep what it holds, go on
                samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": u}]))
                for j, s in enumerate(samples):
                    if j >= c or i >= r + n:
                        break
                    if every is not None and (off + j) % every[1] != every[0]:
                        continue
                    self.reads += 1
                    if i >= start:
                        got += 1
                        yield i, s
                    i += 1
                r, off = r + n, off + c  # the counts keep later shards at their positions
            if whole and got == 0:
                raise DataError(f"shards {self.urls[0]}...: slot {slot} found no samples in a pass")

    def _resume_stream(self, slot, L, state):
        """The slot's shuffled stream, continued from `state` (see the module docstring)."""
        base = int(keyed_rng(self.seed, self.epoch, self.rank, L, 0x5B0F).integers(2**62))
        k, r, ids = state["k"], state["r"], list(state.get("buf") or [])
        reads = self.reads
        if r == 0:
            stream, buf = self._raw_stream(slot), []
        else:
            begin = self.shard_begin(slot, r - 1)
            stream = self._raw_stream(slot, begin)
            want, held = {i for i in ids if i >= begin}, {}
            if r > begin:
                for i, s in stream:
                    if i in want:
                        held[i] = s
                    if i == r - 1:
                        break
            buf = [(i, held[i]) for i in ids if i in held]
        self.resume_stats[L] = {"read": self.reads - reads, "restored": len(buf), "dropped": len(ids) - len(buf),
                                "dropped_ids": [i for i in ids if i not in held] if r else []}
        return ShuffleBuffer(stream, self.shuffle_buffer, base, k, r, buf)

    def _sample(self, s, L, k):
        name = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
        rng = keyed_rng(self.seed, self.epoch, self.rank, L, k)
        video = video_of(s)
        if video is None or "txt" not in s:
            raise DecodeError(name, "sample lacks a video (.mp4 or .f00.jpg ...) or a caption (.txt)")
        # as VideoTextDataset._load: uint8 frames at their own size (shrunk on the host only when
        # far larger than needed) and the crop row that transform.prepare_batch applies
        if self.watchdog is not None:
            frames = self.watchdog.run("sample", (video, self.frames, True, None, self.decoder, name), rng, name)
        else:
            frames = decode_sample(video, self.frames, True, rng, None, self.decoder, name)
        if min(frames.shape[1:3]) > 2 * self.size:
            frames = resize_frames(frames, self.size)
        crop, flipped = draw_params(frames.shape[1], frames.shape[2], self.size, True, rng,
                                    self.crop_scale, self.hflip)
        pixels = torch.from_numpy(np.ascontiguousarray(frames))
        caps = _captions(s)
        caption = caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0]
        caption = self.clean(caption) if self.clean else caption
        if flipped:
            caption = swap_left_right(caption)
        key = s.get("__key__", "")
        index = int(key) if key.isdigit() else int(keyed_rng(*map(ord, key[:32])).integers(2**62))
        return {"pixels": pixels, "crop": crop, "caption": caption, "index": index,
                "epoch": self.epoch, "failures": []}

    def __iter__(self):
        info = get_worker_info()
        p, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if nworkers != self.slots:
            raise DataError(f"ShardDataset built for {self.slots} worker(s) runs in {nworkers}")
        b0 = self.start // self.batch_size
        L = (b0 + p) % self.slots  # the DataLoader's first batch comes from worker 0
        mine = range(L, self.batches_per_epoch, self.slots)
        done = len(range(L, b0, self.slots))
        state = self.raw[L] if self.raw is not None else None
        if isinstance(state, int):  # a state of before buffers were kept: samples taken
            state = {"k": state, "r": state, "buf": []}
        elif state is None:  # a fresh epoch, or another layout: the rank's position alone
            k = done * self.batch_size
            state = {"k": k, "r": k, "buf": []}
        stream = self._resume_stream(self.rank * self.slots + L, L, state)
        in_row = 0
        for _ in range(len(mine) - done):
            samples, failures = [], []
            while len(samples) < self.batch_size:
                _, s = next(stream)
                try:
                    samples.append(self._sample(s, L, stream.k - 1))
                    in_row = 0
                except DecodeError as e:
                    failures.append((e.path, e.reason, e.kind, 0))
                    in_row += 1
                    if in_row > self.max_retries:
                        listed = "; ".join(f"{f[0]} ({f[1]})" for f in failures[-5:])
                        raise DataError(f"{in_row} shard samples in a row failed to decode, "
                                        f"last: {listed}; check the shards") from None
            if failures:
                samples[0]["failures"] = failures
            batch = self.collate(samples)
            batch["shard_slot"], batch["shard_raw"] = L, stream.state()
            yield batch


def _congruent(x, s, n):
    """How many i in [0, x) have i % n == s."""
    return (x - s + n - 1) // n if x > s else 0


def _mix64(x):
    """splitmix64: a well-mixed 64-bit value of x."""
    m = 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


class ShuffleBuffer:
    """webdataset's shuffle buffer (fill two per take up to `bufsize`, first take once `initial`
    = min(bufsize, 100) are in) over a stream of (raw index, sample), whose state can be saved
    and restored: `k` samples taken, `r` the next raw index to pull, the raw indices in the
    buffer (in buffer order). Take number k picks slot hash(base, k) % len(buffer), so a restored
    buffer continues exactly as the original. Yields (raw index, sample). bufsize <= 1: no
    buffer (the stream's order)."""

    def __init__(self, stream, bufsize, base, k=0, r=0, buf=()):
        self.stream, self.bufsize, self.base = iter(stream), bufsize, base
        self.k, self.r, self.buf = k, r, list(buf)
        self.initial = min(bufsize, 100)

    def _pull(self):
        i, s = next(self.stream)
        self.buf.append((i, s))
        self.r = i + 1

    def __iter__(self):
        return self

    def __next__(self):
        if self.bufsize <= 1 and not self.buf:
            i, s = next(self.stream)
            self.r, self.k = i + 1, self.k + 1
            return i, s
        while True:
            if self.bufsize > 1 and len(self.buf) < self.bufsize:
                self._pull()
                if len(self.buf) < self.bufsize:
                    self._pull()
            if len(self.buf) >= self.initial or self.bufsize <= 1:
                j = _mix64(self.base + self.k) % len(self.buf)
                item = self.buf[j]
                self.buf[j] = self.buf[-1]
                self.buf.pop()
                self.k += 1
                return item

    def state(self):
        return {"k": self.k, "r": self.r, "buf": [i for i, _ in self.buf]}


# ----------------------------------------------------------------------------- loader

class ShardLoader(VideoTextLoader):
    """`VideoTextLoader` over a `ShardDataset`: the same counters and batches; its state also
    holds every slot's stream state (`ShuffleBuffer.state`: samples taken, raw position, the
    buffer's raw indices), from which a resume skips the consumed shards (module docstring)."""

    def __init__(self, dataset, loader, timeout=0.0):
        super().__init__(dataset, dataset, loader, timeout)
        self.raw = [None] * dataset.slots

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch, start=0, raw=None):
        self.raw = list(raw) if raw is not None else [None] * self.dataset.slots
        self.dataset.set_epoch(epoch, start, list(self.raw))
        self.epoch, self.position = epoch, start

    def state_dict(self):
        return {**super().state_dict(), "shard_raw": list(self.raw),
                "shard_layout": [self.dataset.world, self.dataset.slots]}

    def load_state_dict(self, state):
        raw = state.get("shard_raw")
        if raw is not None and state.get("shard_layout") != [self.dataset.world, self.dataset.slots]:
            log.warning("resuming shards with %s rank(s) x %s worker slot(s), saved with %s: the "
                        "position is kept approximately", self.dataset.world, self.dataset.slots,
                        state.get("shard_layout"))
            raw = None
        self.set_epoch(state["epoch"], state["position"], raw)
        for k in COUNTERS:
            setattr(self, k, state.get(k, 0))

    def __iter__(self):
        for batch in super().__iter__():
            self.raw[batch["shard_slot"]] = batch["shard_raw"]
            yield batch


def build_shard_loader(spec, tokenizer, *, batch_size, frames=8, size=224, seed=0, num_workers=2,
                       mask_ratio=0.5, rank=0, world_size=1, timeout=120.0, decoder="auto",
                       shuffle_buffer=1000, max_retries=10, pin_memory=False, max_length=MAX_LENGTH,
                       crop_scale=(0.5, 1.0), clean=clean_caption, swap=False, decode_timeout=None,
                       device_transform=None):
    """A `ShardLoader` over the shards of `spec` for one rank: the batches of `build_loader`'s
    training loader (same keys, shapes, transforms, tokenisation and MLM masks; `swap`: with the
    swapped captions of the caption-swap term). decode_timeout (seconds, None: off): every
    sample decodes in a watchdog child (`DecoderProcess`) and one that hangs or crashes is
    skipped and counted, as for files; the loader's last-resort timeout is then at least 4 x it.
    device_transform: as `build_loader`'s (None: True when pin_memory)."""
    if decode_timeout:
        timeout = max(timeout, 4 * decode_timeout)
    urls = expand_shards(spec)
    counts = shard_counts(urls)
    if device_transform is None:
        device_transform = bool(pin_memory)
    collate = Collator(tokenizer, mask_ratio, max_length, seed, device_transform=device_transform, swap=swap)
    dataset = ShardDataset(urls, counts, collate, batch_size,
                           frames=frames, size=size, rank=rank, world_size=world_size, workers=num_workers,
                           seed=seed, shuffle_buffer=shuffle_buffer, decoder=decoder,
                           max_retries=max_retries, crop_scale=crop_scale, clean=clean,
                           decode_timeout=decode_timeout)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        worker_init_fn=worker_init if num_workers else None,
                        timeout=timeout if num_workers else 0, persistent_workers=False,
                        prefetch_factor=2 if num_workers else None)
    out = ShardLoader(dataset, loader, timeout if num_workers else 0.0)
    out.set_epoch(0)
    return out
