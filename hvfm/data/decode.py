"""Decoding F frames of a clip: decord, torchcodec or PyAV (`--decoder`; "auto" tries them in
`AUTO_ORDER`, a measured order, each next one when the former is missing or fails).

Frame sampling splits the clip into F equal segments and takes a random frame of each segment when
training, the middle frame when evaluating. One-frame evaluation takes the exact middle of the
clip, so that an image model cannot read an offset from it: the frame (n - 1) / 2 of an n-frame
clip when n is odd; when n is even no frame is at the middle (frame n // 2 would lie half a step
after it, and show where a moving object is going), so the mean of the two middle frames n/2 - 1
and n/2 (`take_frames`); the clip played backwards gives the same frame. A clip with fewer than F
frames gives all its frames (the caller sees fewer frames). Every way a file can be bad -- missing,
empty, truncated, garbage, not a video, zero frames, a decoder exception -- becomes one
`DecodeError` with a short reason, so the dataset can count it and move on. decord raises
RuntimeError, its own DECORDError, IndexError and AssertionError; PyAV raises its own errors: all
are caught here.

A decoder that hangs (inside C code, where neither a signal nor a thread can stop it) or crashes
(a segfault) cannot be handled from inside the process that runs it. `DecoderProcess` therefore runs
`decode_clip` in a child process: after `timeout` seconds without an answer the child is killed
and a fresh one is forked for the next clip; the clip becomes a `DecodeError` of kind "timeout"
(or "crash") and is skipped like any other bad file. What the child runs is named in
`WATCHDOG_TARGETS` ("module:function" per kind of request: a file, a shard sample held in memory),
imported in the child; a `DecoderProcess` takes the table's entries when it is made, so a test
can point a kind at a decode that hangs or crashes (tests/decode_faults.py) without any hook in
this package.
"""
from __future__ import annotations

import importlib
import os
import pickle
import signal
from pathlib import Path

import numpy as np

try:
    import decord
    decord.logging.set_level(decord.logging.QUIET)
except ImportError:  # decord has wheels for Linux x86-64 only
    decord = None
try:
    import av
    av.logging.set_level(av.logging.PANIC)
except ImportError:
    av = None

DECODERS = ("auto", "decord", "torchcodec", "pyav")
# "auto" tries these in turn. The order is a measurement: on a quiet machine (load 0.2, 1 worker,
# 640x360 10-30 s clips, 8 frames at 224) decord gave 5.2 clips/s per worker from one mp4 per
# clip; decoding alone (8 frames of 3 such clips, one process, at load 8.3 on 2 cores, so a ratio
# and not a figure) decord gave 4.6 clips/s and PyAV, which decodes every frame up to the last one
# sampled, 2.0. torchcodec (it seeks, as decord does) sits between them until
# profiling/bench_data.py measures it where its wheel loads; the bench prints the order its run
# found ("auto_order" in its JSON): update this line from a quiet run.
AUTO_ORDER = ("decord", "torchcodec", "pyav")

_torchcodec = None  # the torchcodec.decoders module once imported; an error string if it cannot be


def torchcodec_status():
    """(module, None) when torchcodec imports, else (None, why not): the PyPI wheel links FFmpeg's
    shared libraries (4-8) and the torch build it was made for; a CPU torch with a CUDA wheel
    fails to load it."""
    global _torchcodec
    if _torchcodec is None:
        try:
            from torchcodec import decoders as tc_decoders
            _torchcodec = tc_decoders
        except Exception as e:  # noqa: BLE001 - ImportError, or OSError from the shared libraries
            _torchcodec = (f"torchcodec does not load ({type(e).__name__}: {_short(e, 160)}); install "
                           f"it with pip install 'hvfm[torchcodec]' for your torch build and FFmpeg's "
                           f"shared libraries (apt install ffmpeg), or pick --decoder decord/pyav")
    if isinstance(_torchcodec, str):
        return None, _torchcodec
    return _torchcodec, None


def available_decoders():
    """{decoder: None if it can be used here, else why not}."""
    tc = torchcodec_status()[1]
    return {"decord": None if decord is not None else "decord not installed (Linux x86-64 wheels only)",
            "torchcodec": tc,
            "pyav": None if av is not None else "PyAV not installed (pip install av)"}


def decoder_order(decoder):
    """The decoders `decoder` ("auto" or one name) tries, in order."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    return AUTO_ORDER if decoder == "auto" else (decoder,)


class DecodeError(Exception):
    """A clip that cannot be used. kind: "bad" (the file), "timeout" (the decoder hung and was
    abandoned) or "crash" (the decoder process died)."""

    def __init__(self, path, reason, kind="bad"):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = str(path), reason, kind


def sample_indices(num_available, num_frames, train, rng=None):
    """Indices of the frames to take: one per equal segment (random in training, middle in eval).

    The evaluation frames are the segment centres rounded half away from the clip's middle, so
    the clip played backwards gives exactly the mirrored frames: a model that cannot see time
    (an image model averaging frames) cannot tell a clip from its reverse either. (Integer
    segment edges would sample the start of a 17-frame clip more densely than its end, and an
    image model then scored 0.8 on order of events.)"""
    if num_available <= 0:
        return []
    if num_available <= num_frames:
        return list(range(num_available))
    if not train:
        centres = (np.arange(num_frames) + 0.5) * num_available / num_frames - 0.5
        last = num_available - 1
        low = centres <= last / 2
        return np.where(low, np.floor(centres + 0.5), last - np.floor(last - centres + 0.5)).astype(int).tolist()
    edges = (np.arange(num_frames + 1) * num_available) // num_frames
    starts, lengths = edges[:-1], np.diff(edges)
    offsets = rng.integers(0, lengths)  # vectorised: one draw per segment
    return (starts + offsets).tolist()


def middle_pair(num_available, num_frames, train):
    """The two middle frames [n/2 - 1, n/2] of an even-length clip (n >= 2) in one-frame
    evaluation, whose mean is the clip's exact middle; else None."""
    if train or num_frames != 1 or num_available < 2 or num_available % 2:
        return None
    return [num_available // 2 - 1, num_available // 2]


def take_frames(get, num_available, num_frames, train, rng=None):
    """The sampled frames of a clip of `num_available` frames: `get(indices)` returns the frames
    at those indices ((T, H, W, 3) uint8, maybe fewer for a truncated file, or None). In
    one-frame evaluation of an even-length clip, the two middle frames blended into one (their
    rounded mean, the same whichever comes first); else `sample_indices`."""
    pair = middle_pair(num_available, num_frames, train)
    if pair is None:
        return get(sample_indices(num_available, num_frames, train, rng))
    frames = get(pair)
    if frames is None or len(frames) != 2:
        return frames
    total = frames[0].astype(np.uint16) + frames[1].astype(np.uint16) + 1
    return (total // 2).astype(np.uint8)[None]


def decode_size(width, height, short_side):
    """(w, h) with the short side scaled to `short_side`, aspect kept, both even and >= 2."""
    if not short_side:
        return width, height
    scale = short_side / min(width, height)
    w, h = round(width * scale), round(height * scale)
    return max(2, w - w % 2), max(2, h - h % 2)


def decode_decord(source, num_frames, train, rng, short_side):
    """decord decode of a file path or a file-like object (an mp4 held in memory)."""
    if not hasattr(source, "read"):
        source = str(source)
    vr = decord.VideoReader(source, num_threads=1)
    frames = take_frames(lambda idx: vr.get_batch(idx).asnumpy(), len(vr), num_frames, train, rng)
    return resize_frames(frames, short_side) if short_side and frames is not None else frames


def decode_torchcodec(source, num_frames, train, rng, short_side, device="cpu"):
    """torchcodec decode of a file path or of bytes: uint8 (T, H, W, 3), numpy on the CPU; with
    device="cuda" (NVDEC) a torch tensor on that device (the training process's own decode: a
    forked loader worker cannot hold a CUDA context)."""
    tc, why = torchcodec_status()
    if tc is None:
        raise ImportError(why)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = bytes(source)
    elif not hasattr(source, "read"):
        source = str(source)
    dec = tc.VideoDecoder(source, device=device, dimension_order="NHWC", num_ffmpeg_threads=1,
                          seek_mode="exact")
    n = dec.metadata.num_frames or 0
    if device == "cpu":
        def get(idx):
            return dec.get_frames_at(indices=list(idx)).data.numpy() if len(idx) else None
        frames = take_frames(get, n, num_frames, train, rng)
        return resize_frames(frames, short_side) if short_side and frames is not None else frames
    import torch
    pair = middle_pair(n, num_frames, train)
    idx = pair or sample_indices(n, num_frames, train, rng)
    if not idx:
        return None
    frames = dec.get_frames_at(indices=list(idx)).data  # (T, H, W, 3) uint8 on the device
    if pair is not None and len(frames) == 2:
        frames = ((frames[0].int() + frames[1].int() + 1) // 2).to(torch.uint8)[None]
    if short_side:
        import torch.nn.functional as F
        x = frames.permute(0, 3, 1, 2).float()
        w, h = decode_size(x.shape[3], x.shape[2], short_side)
        if (h, w) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return frames


def decode_pyav(path, num_frames, train, rng, short_side):
    """PyAV decode of a file path or of a file-like object (an mp4 held in memory)."""
    with av.open(path if hasattr(path, "read") else str(path)) as container:
        stream = container.streams.video[0]
        w, h = decode_size(stream.codec_context.width, stream.codec_context.height, short_side)
        known = stream.frames  # 0 when the container does not say
        if known > 0:
            def decode_at(wanted):
                picked, last = {}, max(wanted)
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        picked[i] = frame.to_ndarray(format="rgb24", width=w, height=h)
                    if i >= last:
                        break
                got = [picked[i] for i in wanted if i in picked]  # a truncated file gives fewer
                return np.stack(got) if got else None
            got = take_frames(decode_at, known, num_frames, train, rng)
            if got is not None:
                return got
            known = 0
        if known <= 0:
            container.seek(0)
            frames = [f.to_ndarray(format="rgb24", width=w, height=h)
                      for f in container.decode(stream)]
            return take_frames(lambda idx: np.stack([frames[i] for i in idx]) if idx
                               else np.zeros((0, h, w, 3), np.uint8),
                               len(frames), num_frames, train, rng)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _image(path, short_side):
    """A still image as one frame (1, H, W, 3) uint8 (Pillow, else PyAV); DecodeError if bad."""
    try:
        try:
            from PIL import Image
        except ImportError:
            Image = None
        if Image is not None:
            with Image.open(path) as im:
                frame = np.array(im.convert("RGB"))
        elif av is not None:
            with av.open(str(path)) as c:
                frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
        else:
            raise DecodeError(path, "neither Pillow nor PyAV is installed to read images")
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad sample
        raise DecodeError(path, f"image: {type(e).__name__}: {_short(e)}") from None
    frames = frame[None]
    if short_side and min(frames.shape[1:3]) != short_side:
        frames = resize_frames(frames, short_side)
    return frames


def resize_frames(frames, short_side):
    """uint8 (T, H, W, 3) with the short side resized to `short_side` (antialiased bilinear,
    rounded); the frames themselves when they already have that size."""
    if frames.shape[1:3] == decode_size(frames.shape[2], frames.shape[1], short_side)[::-1]:
        return frames
    import torch
    import torch.nn.functional as F
    n, h, w, _ = frames.shape
    nw, nh = decode_size(w, h, short_side)
    # uint8 in, uint8 out: torch's integer kernel for channels-last uint8 (about 10x faster on a
    # CPU than a float resize); the same call as the device transform's first resize on a CPU.
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def decode_clip(path, num_frames, train=False, rng=None, short_side=None, decoder="auto",
                file_size=None):
    """Decode `num_frames` frames as uint8 (T, H, W, 3), T <= num_frames; returns (frames, decoder).

    short_side: resize so the shorter side has this many pixels (None: the file's own size).
    decoder: "auto" (decord, then PyAV if decord is missing or fails), "decord" or "pyav".
    file_size: the file's size in bytes when the caller has stat-ed it already (one stat per
    clip; -1: the caller found it missing); None: stat it here.
    Raises DecodeError with a short reason for any bad file.
    """
    order = decoder_order(decoder)
    if train and rng is None:
        raise ValueError("training-mode sampling needs an rng (numpy Generator)")
    path = Path(path)
    size = file_size
    if size is None:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = -1
        except OSError as e:
            raise DecodeError(path, f"cannot stat ({e.strerror})") from None
    if size < 0:
        raise DecodeError(path, "missing file")
    if size == 0:
        raise DecodeError(path, "empty file")
    if path.suffix.lower() in IMAGE_SUFFIXES:  # a still: one frame (stage-1 image pretraining)
        return _image(path, short_side), "image"
    return decode_with(order, path, num_frames, train, rng, short_side, name=path)


IMPLS = {"decord": decode_decord, "torchcodec": decode_torchcodec, "pyav": decode_pyav}


def decode_with(order, source, num_frames, train, rng, short_side, name):
    """Try the decoders of `order` on `source` (a path, or a file-like object / bytes of an mp4)
    in turn; (frames, the decoder that gave them), or DecodeError(name) with every reason. A
    failed attempt gives its random draws back, so the next decoder samples the same frames."""
    reasons, missing, ready = [], [], available_decoders()
    for dec in order:
        if ready[dec] is not None:  # "auto" passes over a decoder that is not here
            missing.append(ready[dec])
            continue
        if hasattr(source, "seek"):
            source.seek(0)
        state = rng.bit_generator.state if rng is not None else None
        try:
            frames = IMPLS[dec](source, num_frames, train, rng, short_side)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample, see above
            if rng is not None:
                rng.bit_generator.state = state
            reasons.append(f"{dec}: {type(e).__name__}: {_short(e)}")
            continue
        if frames is None or len(frames) == 0:
            reasons.append(f"{dec}: no video frames")
            continue
        return frames, dec
    raise DecodeError(name, "; ".join(reasons or missing))


def _short(e, limit=120):
    text = " ".join(str(e).split()) or "no message"
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- watchdog

def _set_parent_death_signal():
    """Linux: the kernel SIGKILLs this process when its parent dies (no orphaned decoders)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def decode_file_request(args, rng):
    """The watchdog child's decode of a file: `decode_clip`'s frames (WATCHDOG_TARGETS["file"])."""
    path, num_frames, train, short_side, decoder, file_size = args
    return decode_clip(path, num_frames, train, rng, short_side, decoder, file_size)[0]


# What a DecoderProcess child runs per kind of request: "module:function", called as
# function(args, rng) -> uint8 frames (raising DecodeError for a bad sample).
WATCHDOG_TARGETS = {"file": "hvfm.data.decode:decode_file_request",
                    "sample": "hvfm.data.loading.shards:decode_sample_request"}


def resolve_target(spec):
    """The function a "module:function" spec names (imported here, in the child)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(conn, parent, shm, targets):
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return
    try:  # the parent's handlers (torch's worker ones) must not run here: die as a plain process
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread: keep them
        pass
    functions = {}
    while True:
        try:
            kind, args, state = conn.recv()
        except (EOFError, OSError):
            return
        rng = None
        if state is not None:
            rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
            rng.bit_generator.state = state
        try:
            if kind not in functions:
                functions[kind] = resolve_target(targets[kind])
            frames = np.ascontiguousarray(functions[kind](args, rng))
            if frames.nbytes <= len(shm):  # the frames go through the shared buffer, not the pipe
                np.frombuffer(shm, np.uint8, frames.nbytes)[:] = frames.reshape(-1).view(np.uint8)
                reply = ("shm", (frames.shape, frames.dtype.str))
            else:  # larger than the buffer: this once by pipe; the parent grows the buffer
                reply = ("ok", frames)
        except DecodeError as e:
            reply = ("bad", e.reason)
        except Exception as e:  # noqa: BLE001 - a caller error (bad argument): re-raised there
            reply = ("raise", e)
        try:
            conn.send((*reply, rng.bit_generator.state if rng is not None else None))
        except (EOFError, OSError):
            return


class DecoderProcess:
    """Decoding in a child process, abandoned after `timeout` seconds.

    One child per process that uses it (each loader worker forks its own on first use, from a
    state where it has decoded nothing itself). `decode` decodes a file (`decode_clip`), `run`
    any kind of request of `WATCHDOG_TARGETS` (the shard loader's samples held in memory). A
    request the child does not answer within `timeout` seconds raises DecodeError(kind="timeout");
    one that kills the child raises kind="crash"; in both cases the child is killed (SIGKILL) and
    reaped, and the next request starts a new one. The rng advances exactly as in-process
    decoding would advance it, so batches do not depend on whether the watchdog is on. The child
    also dies with its parent (Linux PR_SET_PDEATHSIG). `targets`: the table the child imports
    its functions from (default: `WATCHDOG_TARGETS` as it is when this object is made).

    Frames come back through a shared anonymous mapping made before the fork (`buffer_bytes`,
    pages are only allocated when written): the pipe carries the shape and dtype, the parent
    copies the frames out once. A clip larger than the buffer comes through the pipe that once
    and the next child gets a buffer twice its size. `reply_bytes` is the size of the last answer
    on the pipe.
    """

    def __init__(self, timeout, buffer_bytes=64 << 20, targets=None):
        if not timeout or timeout <= 0:
            raise ValueError(f"decode timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.buffer_bytes = int(buffer_bytes)
        self.targets = dict(WATCHDOG_TARGETS if targets is None else targets)
        self._pid = self._conn = self._owner = self._shm = None
        self.started = 0
        self.reply_bytes = 0

    def __getstate__(self):  # a copy (spawned worker) starts its own child
        return {"timeout": self.timeout, "buffer_bytes": self.buffer_bytes, "targets": self.targets}

    def __setstate__(self, state):
        self.__init__(state["timeout"], state.get("buffer_bytes", 64 << 20), state.get("targets"))

    def _start(self):
        import mmap
        from multiprocessing import Pipe
        ours, theirs = Pipe(duplex=True)
        shm = mmap.mmap(-1, self.buffer_bytes, flags=mmap.MAP_SHARED)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                _serve(theirs, parent, shm, self.targets)
            except BaseException:  # noqa: BLE001 - never return into the parent's code
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self._pid, self._conn, self._owner, self._shm = pid, ours, parent, shm
        self.started += 1

    def close(self):
        """Kill and reap the child; returns a description of how it ended."""
        pid, conn, shm = self._pid, self._conn, self._shm
        self._pid = self._conn = self._shm = None
        if pid is None or self._owner != os.getpid():
            return "not running"
        if shm is not None:
            shm.close()
        if conn is not None:
            conn.close()
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                return "killed"
        except ChildProcessError:
            return "gone"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit code {os.WEXITSTATUS(status)}"

    def decode(self, path, num_frames, train=False, rng=None, short_side=None, decoder="auto",
               file_size=None):
        """`decode_clip(...)[0]` of a file, in the child."""
        return self.run("file", (str(path), num_frames, train, short_side, decoder, file_size), rng, path)

    def run(self, kind, args, rng, name):
        """The frames `WATCHDOG_TARGETS[kind]` gives for (args, rng), computed in the child;
        DecodeError(name) for a bad sample, a hang (kind "timeout") or a crash (kind "crash")."""
        if kind not in self.targets:
            raise ValueError(f"unknown watchdog request {kind!r}; known: {', '.join(self.targets)}")
        if self._owner != os.getpid():  # a forked copy: the child (and buffer) belong to the parent
            self._pid = self._conn = self._shm = None
        if self._pid is None:
            self._start()
        state = rng.bit_generator.state if rng is not None else None
        try:
            self._conn.send((kind, args, state))
            answered = self._conn.poll(self.timeout)
        except (EOFError, OSError):
            answered = True  # the child is gone: recv below reports it
        if not answered:
            self.close()
            raise DecodeError(name, f"decoder timed out after {self.timeout:g} s; abandoned", "timeout")
        try:
            message = self._conn.recv_bytes()
        except (EOFError, OSError):
            how = self.close()
            raise DecodeError(name, f"decoder process crashed ({how})", "crash") from None
        self.reply_bytes = len(message)
        status, payload, new_state = pickle.loads(message)
        if rng is not None and new_state is not None:
            rng.bit_generator.state = new_state
        if status == "shm":
            shape, dtype = payload
            count = int(np.prod(shape))
            return np.frombuffer(self._shm, np.dtype(dtype), count).reshape(shape).copy()
        if status == "ok":  # too large for the buffer: give the next child a larger one
            self.buffer_bytes = max(self.buffer_bytes, 2 * payload.nbytes)
            self.close()
            return payload
        if status == "raise":
            raise payload
        raise DecodeError(name, payload)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
