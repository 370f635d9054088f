"""Small real video files for tests, and every kind of broken one."""
from pathlib import Path

import av
import numpy as np


def frame_pattern(i, h, w):
    """Frame i is flat grey at level 20 + 5 i, so a test can tell which frame it decoded."""
    return np.full((h, w, 3), min(255, 20 + 5 * i), np.uint8)


def frame_index(frame):
    """Inverse of frame_pattern on a decoded (H, W, 3) frame."""
    return int(round((float(np.asarray(frame, np.float64).mean()) - 20) / 5))


def write_clip(path, frames=10, width=64, height=48, fps=8, faststart=False):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"threads": "1", "crf": "10"}
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_broken(path, kind, good=None):
    """A broken 'video' of the given kind at `path` (missing: nothing is written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # cut mid-stream, index at the end: the index is lost
        data = Path(good).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "truncated_faststart":  # index first, then half the frame data
        data = write_clip(path, frames=20, faststart=True).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("this is not a video\n" * 20)
    elif kind == "zero_frames":
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            c.start_encoding()  # header only, no frame
    else:
        raise ValueError(kind)
    return path


BROKEN_KINDS = ("missing", "empty", "truncated", "truncated_faststart", "garbage", "text", "zero_frames")
