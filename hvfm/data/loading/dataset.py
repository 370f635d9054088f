"""Dataset, sampler, collate and loader: annotations in, model-ready batches out.

Determinism: every random choice of a sample (frames, crop, flip, a replacement for a bad file)
comes from a numpy Generator seeded by (seed, epoch, index), and the MLM masks of a batch from a
generator seeded by (seed, epoch, the batch's indices). A batch is therefore the same whatever the
number of workers, and a resumed run sees exactly the samples it would have seen.

Bad files: a sample whose video cannot be decoded is replaced by another random sample, up to
`max_retries` times; each failure travels with the batch so the main process counts every skip and
logs each bad file once (workers are separate processes: counts kept there would be lost). The
k-th replacement of index i is `replacement(i, epoch, k)` and is loaded with its own generator
seeded by (seed, epoch, i, k): what a failed attempt consumed never shifts what comes next, so the
number of skips is a function of (seed, epoch, the indices drawn, the set of bad files) alone.
A clip with at least one decodable frame is a (short) sample, zero-padded in the batch; a clip
with zero decodable frames is a bad file.

Workers send uint8 frames at the size the decoder gave them (a file whose short side is more than
twice the training size is shrunk to it first, so a 4K file does not cross as 4K) and one row of
crop parameters per sample, drawn here as before; `transform.prepare_batch` crops, resizes and
normalises on the device (see hvfm/data/transforms/device.py). The batch's "pixels" are therefore uint8
(B, T, H, W, 3) with a "crop" tensor beside them until `prepare_batch` turns them into the float
(B, T, 3, size, size) the model takes. Without a GPU (`device_transform=False`, the default when
the loader does not pin memory) the workers' collate runs that same function, so a CPU run keeps
the transform off the training process; `prepare_batch` then only moves and casts.

Hung and crashing decoders: with `decode_timeout` (seconds) every decode runs in a
`DecoderProcess` child (the shard loader's too) that is killed after that long (or when it crashes) and replaced; the
sample counts as a skip of kind "timeout" (or "crash"). The DataLoader `timeout` stays as a last
resort for a worker that stalls outside decoding.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..decode import DecodeError, DecoderProcess, resize_frames, decode_clip
from ..errors import DataError
from ..text.tokens import MAX_LENGTH, MLMMasker, place_axes, swap_left_right, swap_top_bottom, tokenize
from ..transforms.device import collate_frames, draw_params, mirror_params, to_model_pixels
from ..text.swap import swap_captions

log = logging.getLogger("hvfm.data")


def keyed_rng(*key):
    """A numpy Generator seeded by the integers `key` (each taken mod 2**32): the one way every
    random choice of the data side is seeded."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


class VideoTextDataset(Dataset):
    """(video, caption) pairs of an `Annotations`. Items are requested as (index, epoch)."""

    def __init__(self, ann, frames=8, size=224, train=True, seed=0, max_retries=10,
                 decoder="auto", hflip=0.5, swap_lr_on_flip=True, min_frames=1, decode_timeout=None,
                 crop_scale=(0.5, 1.0)):
        self.ann, self.frames, self.size, self.train = ann, frames, size, train
        self.seed, self.max_retries, self.decoder = seed, max_retries, decoder
        self.min_frames, self.swap_lr_on_flip = min_frames, swap_lr_on_flip
        self.hflip, self.crop_scale = (hflip if train else 0.0), crop_scale
        self.watchdog = DecoderProcess(decode_timeout) if decode_timeout else None

    def __len__(self):
        return len(self.ann)

    def _load(self, pair, rng):
        video = int(self.ann.pair_video[pair])
        path, file_size = self.ann.locate(video)  # the clip's one stat, shared with the decoder
        if self.watchdog is not None:
            frames = self.watchdog.decode(path, self.frames, self.train, rng, None, self.decoder,
                                          file_size)
        else:
            frames, _ = decode_clip(path, self.frames, self.train, rng, decoder=self.decoder,
                                    file_size=file_size)
        if len(frames) < self.min_frames:
            raise DecodeError(path, f"{len(frames)} frame(s), fewer than the {self.min_frames} required")
        if min(frames.shape[1:3]) > 2 * self.size:
            frames = resize_frames(frames, self.size)
        crop, flipped = draw_params(frames.shape[1], frames.shape[2], self.size, self.train, rng,
                                    self.crop_scale, self.hflip)
        caption = self.ann.pair_caption[pair]
        if flipped and self.swap_lr_on_flip:
            caption = swap_left_right(caption)
        return torch.from_numpy(np.ascontiguousarray(frames)), crop, caption

    def replacement(self, index, epoch, attempt):
        """The pair that stands in for `index` at its `attempt`-th (>= 1) failed try."""
        return int(keyed_rng(self.seed, epoch, index, 0xBAD, attempt).integers(len(self.ann)))

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        failures, pair = [], index
        for attempt in range(self.max_retries + 1):
            if attempt:
                pair = self.replacement(index, epoch, attempt)
                rng = keyed_rng(self.seed, epoch, index, attempt)
            else:
                rng = keyed_rng(self.seed, epoch, index)
            try:
                pixels, crop, caption = self._load(pair, rng)
                return {"pixels": pixels, "crop": crop, "caption": caption, "index": pair,
                        "epoch": epoch, "failures": failures}
            except DecodeError as e:
                # (path, reason, kind, attempt): attempt 0 is the row the sampler drew
                failures.append((e.path, e.reason, e.kind, attempt))
        listed = "; ".join(f"{f[0]} ({f[1]})" for f in failures[-5:])
        raise DataError(f"{self.ann.source}: {len(failures)} samples in a row failed to decode, "
                        f"last: {listed}; check --video-root and the video files")


class ResumableDistributedSampler(Sampler):
    """Shards a (shuffled) permutation across ranks like DistributedSampler, yields (index, epoch)
    and can start mid-epoch (`start`, in samples of this rank) for exact resumption."""

    def __init__(self, n, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False,
                 num_samples=None):
        """num_samples: samples per rank (default: n / num_replicas, rounded as drop_last
        says); with num_replicas=1 over a rank's own rows (a sharded CSV) it is the count every
        rank draws, the permutation wrapped as needed."""
        if n == 0:
            raise DataError("the dataset is empty: no samples to draw")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start = 0, 0
        per_rank = n // num_replicas if drop_last else math.ceil(n / num_replicas)
        self.num_samples = per_rank if num_samples is None else int(num_samples)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.num_samples - self.start

    def indices(self):
        if self.shuffle:
            order = keyed_rng(self.seed, self.epoch, 0xC0FFEE).permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.num_samples * self.num_replicas
        if total > self.n:  # pad by wrapping so every rank gets the same count
            order = np.resize(order, total)
        return order[:total][self.rank::self.num_replicas]

    def __iter__(self):
        for i in self.indices()[self.start:]:
            yield int(i), self.epoch


class Collator:
    """Stacks samples (zero-pads frames to the longest clip), tokenises captions, masks for MLM.

    `mirror` (stage-1 stills), a fraction in [0, 1]: that share of the samples (each a draw
    seeded by the sample) also enters the batch mirrored along an axis its caption names (left-right
    or top-bottom, drawn when it names both; captions without place words are not mirrored), with
    the place words of its caption swapped. The two captions then differ only in where things are,
    so a contrastive loss cannot be met by colour and shape alone (within the built-in stage 1's
    budget it did not teach place either: README, "How time gets in").

    `swap` (the caption-swap term, see `swap.swap_captions`): the batch also carries the swapped
    captions of the rows that have a pair, tokenised: "swap_index" (K,) their rows, and
    "swap_input_ids" / "swap_attention_mask" (max(K, 1), L'). With K = 0 the one row is the first
    caption unchanged, so the model runs the same text-tower pass (the same ZeRO-3 gathers) on
    every rank whatever the batch holds; its term is then 0."""

    def __init__(self, tokenizer, mask_ratio=0.5, max_length=MAX_LENGTH, seed=0, mirror=0.0,
                 device_transform=True, swap=False):
        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self.swap = bool(swap)
        self.masker = MLMMasker(tokenizer, mask_ratio)
        self.mirror = float(mirror)
        self.device_transform = device_transform

    def _mirrored(self, s):
        draw = keyed_rng(self.seed, s["epoch"], s["index"], 0x5EE).random(2)
        axes = place_axes(s["caption"])  # mirrored along an axis its caption does not name, the
        if draw[0] >= self.mirror or not axes:  # still would be a second positive of its caption
            return None
        vertical = axes[int(draw[1] * len(axes))] == "tb"
        caption = (swap_top_bottom if vertical else swap_left_right)(s["caption"])
        return {**s, "crop": mirror_params(s["crop"], vertical), "caption": caption, "failures": []}

    def __call__(self, samples):
        if self.mirror:
            samples = list(samples) + [m for m in map(self._mirrored, samples) if m is not None]
        pixels, crop, num_frames = collate_frames([s["pixels"] for s in samples],
                                                  [s["crop"] for s in samples])
        extra = {"crop": crop}
        if not self.device_transform:  # the device is this CPU: spare the training process
            pixels, extra = to_model_pixels(pixels, crop, num_frames), {}
        captions = [s["caption"] for s in samples]
        ids, attn, special = tokenize(self.tokenizer, captions, self.max_length)
        index = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
        key = keyed_rng(self.seed, samples[0]["epoch"], *index.tolist()).integers(2**62)
        gen = torch.Generator().manual_seed(int(key))
        mlm_ids, mlm_labels = self.masker(ids, attn, special, gen)
        failures = [f for s in samples for f in s["failures"]]
        extra.update(self._swapped(captions) if self.swap else {})
        return {
            "pixels": pixels, **extra,  # uint8 frames + crop rows: see transform.prepare_batch
            "num_frames": num_frames,
            "input_ids": ids, "attention_mask": attn,
            "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels,
            "captions": captions, "index": index,
            "failures": failures, "n_skipped": len(failures),
        }


    def _swapped(self, captions):
        return swap_fields(self.tokenizer, captions, self.max_length)


def swap_fields(tokenizer, captions, max_length):
    """The caption-swap term's batch fields for `captions`: "swap_index" (K,) the rows with a pair
    of words to swap, "swap_input_ids" / "swap_attention_mask" (max(K, 1), L') their swapped
    captions tokenised (with K = 0 the one row is the first caption, unused)."""
    swapped, changed = swap_captions(captions)
    rows = [i for i, c in enumerate(changed) if c]
    ids, attn, _ = tokenize(tokenizer, [swapped[i] for i in rows] or captions[:1], max_length)
    return {"swap_index": torch.tensor(rows, dtype=torch.int64), "swap_input_ids": ids,
            "swap_attention_mask": attn}


def local_ranks_from_env(environ=None):
    """Ranks on this machine, as the launcher says: LOCAL_SIZE (the deepspeed launcher, also its
    MPI runners), else LOCAL_WORLD_SIZE (torchrun), else 1."""
    import os
    environ = os.environ if environ is None else environ
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        try:
            n = int(environ.get(name, ""))
        except ValueError:
            continue
        if n >= 1:
            return n
    return 1


def default_workers(cpus=None, local_ranks=None):
    """Loader workers per rank when --workers is not given: one core per rank stays with the
    training process, the rest decode: cpus // local ranks - 1, at least 1 (no upper cap: a node
    of 8 GPUs and 200 cores gives each rank 24 decoders, which WebVid-scale decoding needs).
    cpus: the cores this process may run on; local ranks: `local_ranks_from_env`."""
    import os
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
    if local_ranks is None:
        local_ranks = local_ranks_from_env()
    return max(1, cpus // max(1, local_ranks) - 1)


def worker_init(worker_id):
    # Decoding and transforms are single-threaded per worker; many threads per worker oversubscribe.
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random
    random.seed(seed)


COUNTERS = ("skipped", "bad_drawn", "timeouts", "crashes")


class VideoTextLoader:
    """Iterates a DataLoader, counting skipped samples and logging each bad file once.

    skipped: every failed decode (a bad row the sampler drew, and every failed replacement);
    bad_drawn: the rows the sampler drew that were bad (attempt 0); timeouts / crashes: the
    failures that were a hung decoder abandoned after `decode_timeout`, or a crashed one."""

    def __init__(self, dataset, sampler, loader, timeout=0.0):
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self.skipped = self.bad_drawn = self.timeouts = self.crashes = 0
        self.bad_files = {}
        self.timeout = timeout
        self.epoch, self.position = 0, 0  # samples of this rank consumed in `epoch`

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch, start)
        self.epoch, self.position = epoch, start

    def counters(self):
        return {k: getattr(self, k) for k in COUNTERS}

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, **self.counters()}

    def load_state_dict(self, state):
        self.set_epoch(state["epoch"], state["position"])
        for k in COUNTERS:
            setattr(self, k, state.get(k, 0))

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                raise DataError(f"no batch from the loader workers in {self.timeout:g} s: a worker is "
                                f"stuck (a hung decoder, when --decode-timeout is 0) or the video "
                                f"storage stalls; check the storage, keep --decode-timeout on") from None
            self.position += len(batch["index"])
            self.skipped += batch["n_skipped"]
            for path, reason, kind, attempt in batch["failures"]:
                self.bad_drawn += attempt == 0
                self.timeouts += kind == "timeout"
                self.crashes += kind == "crash"
                if path not in self.bad_files:
                    self.bad_files[path] = reason
                    log.warning("skipped %s: %s", path, reason)
            yield batch


def build_loader(ann, tokenizer, *, batch_size, frames=8, size=224, train=True, seed=0,
                 num_workers=2, mask_ratio=0.5, rank=0, world_size=1, timeout=120.0,
                 decoder="auto", max_retries=10, drop_last=None, pin_memory=False, max_length=MAX_LENGTH,
                 decode_timeout=None, mirror=0.0, crop_scale=(0.5, 1.0), device_transform=None,
                 swap=False):
    """A `VideoTextLoader` over `ann` for one rank. Training shuffles and drops the last partial
    batch; evaluation keeps order and everything. decode_timeout (seconds, None: off): abandon a
    decode that takes longer (see `DecoderProcess`); the loader's last-resort `timeout` is then
    raised to at least 4 x decode_timeout so a few hung files in one batch never trip it.
    mirror: that fraction of the samples also enters its batch mirrored (see `Collator`).
    swap: batches also carry the swapped captions of the caption-swap term (see `Collator`).
    crop_scale: area range of the training crop (stills whose captions name places: near 1).
    device_transform: batches carry uint8 frames + crop rows for `transform.prepare_batch` on the
    device (True), or the workers run that same transform and send float32 pixels (False: for a
    CPU-only run, where the device is the host and the training process should not do it).
    None: True when pin_memory (batches bound for a GPU)."""
    if device_transform is None:
        device_transform = bool(pin_memory)
    dataset = VideoTextDataset(ann, frames, size, train, seed, max_retries, decoder,
                               decode_timeout=decode_timeout, crop_scale=crop_scale)
    if decode_timeout:
        timeout = max(timeout, 4 * decode_timeout)
    shard = getattr(ann, "shard", None)
    if shard is not None:  # the annotations hold this rank's rows only: sample within them
        if tuple(shard[:2]) != (rank, world_size):
            raise DataError(f"{ann.source}: read for rank {shard[0]} of {shard[1]}, loaded by rank "
                            f"{rank} of {world_size}; pass the same rank and world size to "
                            f"read_annotations and build_loader")
        sampler = ResumableDistributedSampler(len(dataset), 1, 0, shuffle=train,
                                              seed=seed, num_samples=math.ceil(shard[2] / world_size))
    else:
        sampler = ResumableDistributedSampler(len(dataset), world_size, rank, shuffle=train,
                                              seed=seed, drop_last=False)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=Collator(tokenizer, mask_ratio, max_length, seed, mirror, device_transform, swap),
        drop_last=train if drop_last is None else drop_last, pin_memory=pin_memory,
        worker_init_fn=worker_init if num_workers else None,
        timeout=timeout if num_workers else 0, persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers else None)
    return VideoTextLoader(dataset, sampler, loader, timeout if num_workers else 0.0)
