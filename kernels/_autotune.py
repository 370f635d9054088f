"""`triton.autotune` with its choices kept on disk, and a report of what the first calls cost.

Every process used to autotune each (kernel, key) again in its first step: tens of configs
compiled and timed, about a minute on a GPU. `autotune` below is `triton.autotune` (same configs,
key and early_config_prune) whose choice for a key is written to a small JSON file; a later
process with the same kernel source, key, candidate configs, device name and Triton version reads
it and compiles only the chosen config (whose binary Triton's own cache usually holds too).

Cache folder: `$HVFM_AUTOTUNE_CACHE` if set (`off` disables the cache), else `hvfm_autotune`
inside Triton's cache folder (`$TRITON_CACHE_DIR`, default `~/.triton/cache`). One file per
entry, written atomically; delete the folder to re-tune. An unreadable or stale file is ignored
(the key is tuned again and the file rewritten). Triton's own `cache_results` (Triton >= 3.4) is
left off: it keys by arch, not device name (an H100 and an H200 share sm_90 and not their best
tiles) and tells no caller whether it hit.

`HVFM_AUTOTUNE=off` skips the search: each key takes the first candidate its prune leaves (the
first config listed for its arch and class), nothing is timed or written. For quick checks and
tests that prove kernels right rather than fast.

`autotune_report()` lists each (kernel, key) first seen in this process: where its config came
from (`tuned` here, `disk`, `single`: one candidate, nothing to time, or `first`: search off) and
the wall seconds of
that first call (compiling, and for `tuned` benchmarking every candidate). Later calls of a key
cost nothing extra; nothing here reads a device value (no sync).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import triton
from triton.runtime.autotuner import Autotuner

from ._config import cuda_index

CACHE_ENV = "HVFM_AUTOTUNE_CACHE"
SEARCH_ENV = "HVFM_AUTOTUNE"  # "off": no search, each call takes its first candidate
_RECORDS: list[dict] = []
_DEVICE_NAMES: dict = {}


def cache_dir() -> str | None:
    """The folder of the autotune cache, or None when `$HVFM_AUTOTUNE_CACHE` is `off`."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip():
        return None if env.strip().lower() in ("off", "0", "none") else os.path.expanduser(env)
    try:
        from triton import knobs
        base = knobs.cache.dir
    except (ImportError, AttributeError):  # older Triton: the same default
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"),
                                                                   ".triton", "cache")
    return os.path.join(base, "hvfm_autotune")


def search_off() -> bool:
    return os.environ.get(SEARCH_ENV, "").strip().lower() in ("off", "0", "false", "no")


def device_name(named_args) -> str:
    """Name and capability of the first CUDA tensor's device ('cpu' without one)."""
    import torch
    idx = cuda_index(named_args)
    if idx is None:
        return "cpu"
    if idx not in _DEVICE_NAMES:
        major, minor = torch.cuda.get_device_capability(idx)
        _DEVICE_NAMES[idx] = f"{torch.cuda.get_device_name(idx)} (sm_{major}{minor})"
    return _DEVICE_NAMES[idx]


def config_spec(cfg) -> dict:
    """A triton.Config as plain JSON."""
    return dict(kwargs=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                num_ctas=getattr(cfg, "num_ctas", 1), maxnreg=getattr(cfg, "maxnreg", None))


def _json_value(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def entry_path(folder: str, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return os.path.join(folder, f"{identity['kernel']}-{digest[:32]}.json")


def read_entry(path: str, identity: dict, candidates):
    """The candidate config a cache file chose, or None (absent, unreadable, or another
    identity / a config no longer offered)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("identity") != identity:
        return None
    return next((c for c in candidates if config_spec(c) == data.get("best")), None)


def write_entry(path: str, identity: dict, best, timings=None) -> None:
    """Atomic write (temporary file + rename): concurrent ranks writing the same entry are safe."""
    data = dict(identity=identity, best=config_spec(best), written=time.time())
    if timings:
        data["timings_ms"] = [[str(c), [t if t != float("inf") else None for t in list(ts)]]
                              for c, ts in timings.items()]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # a read-only cache costs a re-tune next time, never a failed step
        pass


def _source_hash(fn) -> str:
    jit = fn
    while not hasattr(jit, "cache_key") and hasattr(jit, "fn"):
        jit = jit.fn
    key = getattr(jit, "cache_key", None)
    if key is None:  # interpreter functions: hash the Python source
        import inspect
        base = fn
        while not inspect.isfunction(base):
            base = base.fn
        key = hashlib.sha256(inspect.getsource(base).encode()).hexdigest()
    return str(key)


class CachedAutotuner(Autotuner):
    """`triton.runtime.autotuner.Autotuner` + the disk cache and the first-call report."""

    def __init__(self, fn, configs, key, name, prune=None, do_bench=None):
        super().__init__(fn, fn.arg_names, configs, key, None, None,
                         prune_configs_by={"early_config_prune": prune} if prune else None,
                         do_bench=do_bench)
        self.name = name
        self._seen = set()
        self._source = None

    def tuning_key(self, args, kwargs) -> tuple:
        """The key `Autotuner.run` files its choice under: the key arguments' values, then the
        dtype of every tensor argument."""
        all_args = {**dict(zip(self.arg_names, args)), **kwargs}
        named = {k: v for k, v in all_args.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)

    def run(self, *args, **kwargs):
        key = self.tuning_key(args, kwargs)
        if key in self._seen:
            return super().run(*args, **kwargs)
        return self._first_run(key, args, kwargs)

    def _first_run(self, key, args, kwargs):
        t0 = time.perf_counter()
        nargs = dict(zip(self.arg_names, args))
        source, path, identity, n = "single", None, None, 1
        before = set(self.cache)
        if len(self.configs) > 1 and key not in self.cache:
            self.nargs = nargs
            candidates = self.prune_configs(kwargs)
            n = len(candidates)
            if n == 1 or search_off():  # nothing to time / no search wanted
                self.cache[key] = candidates[0]
                source = "single" if n == 1 else "first"
            else:
                source = "tuned"
                folder = cache_dir()
                if folder:
                    if self._source is None:
                        self._source = _source_hash(self.fn)
                    identity = dict(kernel=self.name, source=self._source,
                                    triton=triton.__version__, device=device_name(nargs),
                                    key=[_json_value(v) for v in key],
                                    candidates=[str(c) for c in candidates])
                    path = entry_path(folder, identity)
                    chosen = read_entry(path, identity, candidates)
                    if chosen is not None:
                        self.cache[key] = chosen
                        source = "disk"
        out = super().run(*args, **kwargs)
        seconds = time.perf_counter() - t0
        if set(self.cache) - before - {key}:  # Triton filed it under another key: it tuned
            source = "tuned"
        best = self.cache.get(key, getattr(self, "best_config", None) or self.configs[0])
        if source == "tuned" and path is not None:
            write_entry(path, identity, best, getattr(self, "configs_timings", None))
        self._seen.add(key)
        named = {k: _json_value(v) for k, v in zip(self.keys, key)}
        named["dtypes"] = [str(v).replace("torch.", "") for v in key[len(self.keys):]]
        _RECORDS.append(dict(kernel=self.name, key=named,
                             source=source, candidates=n, seconds=round(seconds, 4),
                             config=config_spec(best), file=path))
        return out


def autotune(configs, key, name=None, prune=None, do_bench=None):
    """Decorator: `triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})`
    with the disk cache and the report (module docstring)."""
    def deco(fn):
        return CachedAutotuner(fn, configs, key, name or getattr(fn, "__name__", None)
                               or fn.fn.__name__, prune=prune, do_bench=do_bench)
    return deco


def autotune_report(reset: bool = False) -> dict:
    """What the first call of each (kernel, key) of this process cost, and where its config came
    from: {"seconds", "keys", "tuned", "disk", "single", "first", "cache_dir", "entries": [...]}.
    `reset`: forget the entries (the report of a later phase starts empty)."""
    entries = [dict(e) for e in _RECORDS]
    if reset:
        _RECORDS.clear()
    count = {s: sum(e["source"] == s for e in entries)
             for s in ("tuned", "disk", "single", "first")}
    return dict(seconds=round(sum(e["seconds"] for e in entries), 3), keys=len(entries), **count,
                cache_dir=cache_dir(), entries=entries)


def format_report(report: dict) -> str:
    """One line for logs: total seconds, keys and where their configs came from."""
    first = f", {report['first']} untuned ({SEARCH_ENV}=off)" if report.get("first") else ""
    return (f"autotune+compile: {report['seconds']:.1f} s over {report['keys']} kernel keys "
            f"({report['tuned']} tuned, {report['disk']} from the disk cache, {report['single']} "
            f"single-config{first}); cache: {report['cache_dir'] or 'off'}")
