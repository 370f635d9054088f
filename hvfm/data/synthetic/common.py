"""What both synthetic corpora share: the cache folder, build-once (a temporary sibling renamed
into place), the worker pool that renders them, and the shapes they draw."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np


def cache_root():
    """$HVFM_CACHE, or ~/.cache/hvfm: where hvfm keeps what it builds once per machine."""
    base = os.environ.get("HVFM_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "hvfm"


def default_cache_dir():
    """$HVFM_CACHE/synthetic, or ~/.cache/hvfm/synthetic."""
    return cache_root() / "synthetic"


def is_complete(root, want, marker=".complete"):
    """Whether `root` holds a finished corpus of these parameters: its marker file (written last)
    names them."""
    try:
        have = json.loads((Path(root) / marker).read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in want.items())


def build_once(final, complete, make):
    """The cached folder `final`, made by `make(tmp)` unless `complete(final)` already: made in a
    temporary sibling and renamed into place, so a crash never leaves half of one; a stale or
    half-written `final` is moved aside; a process that loses a race discards its copy and uses
    the winner's. Returns `final`."""
    final = Path(final)
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        make(tmp)
        if final.exists() and not complete(final):  # stale or half-written: move aside
            trash = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass  # someone else moved it first
        try:
            tmp.rename(final)
        except OSError:
            if not complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def run_tasks(fn, tasks, workers, every=0, what="items", chunksize=16):
    """fn(task) for every task, in `workers` processes (fork where the platform has it); a
    progress line every `every` tasks (0: none). Results are not kept: each task writes a file."""
    t0 = time.time()
    if workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            done = pool.imap_unordered(fn, tasks, chunksize=chunksize)
            for k, _ in enumerate(done):
                if every and (k + 1) % every == 0:
                    print(f"{k + 1}/{len(tasks)} {what}, {time.time() - t0:.0f}s", flush=True)
        return
    for k, task in enumerate(tasks):
        fn(task)
        if every and (k + 1) % every == 0:
            print(f"{k + 1}/{len(tasks)} {what}, {time.time() - t0:.0f}s", flush=True)


def shape_mask(shape, dx, dy, r):
    """Pixels of a shape of radius r (pixels) given offsets dx, dy from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up, base at +0.75 r
        return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= (dy + r) / 1.75)
    if shape == "cross":
        thin = 0.32 * r
        return (((np.abs(dx) <= thin) & (np.abs(dy) <= r))
                | ((np.abs(dy) <= thin) & (np.abs(dx) <= r)))
    if shape == "diamond":  # a rhombus, taller than wide
        return np.abs(dx) / (0.75 * r) + np.abs(dy) / r <= 1.0
    if shape == "star":  # five points, one up; inner radius 0.45 r
        theta = np.arctan2(dx, -dy)  # 0 straight up
        a = np.abs(np.mod(theta + np.pi / 5, 2 * np.pi / 5) - np.pi / 5)  # 0 at a point
        p1 = 0.45 * r * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])
        d = p1 - np.array([r, 0.0])
        edge = (r * d[1]) / (np.cos(a) * d[1] - np.sin(a) * d[0])  # ray meets the edge
        return dx * dx + dy * dy <= edge * edge
    raise ValueError(f"unknown shape {shape!r}")
