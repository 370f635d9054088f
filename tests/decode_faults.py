"""Decoder faults for the tests, outside the package: a decode that hangs for ever with every
signal blocked (as a stuck C call would: nothing but SIGKILL ends it) or that kills its process
with SIGSEGV, for chosen files or shard samples.

The watchdog child (hvfm.data.decode.DecoderProcess) runs the functions that
`decode.WATCHDOG_TARGETS` names; `install(spec)` points them at the wrappers below, which fault
on the names in `spec` and decode everything else as the package does. spec:
"hang:NAME,crash:NAME2" -- NAME is a file's name (clip.mp4), or a shard sample's key (its
`__key__`, e.g. 000000003). A DecoderProcess made after `install` uses them; the loader workers
and their children inherit them by fork. Launched trainers get them from tests/fault_train.py,
which calls `install(os.environ["HVFM_TEST_DECODE_FAULT"])` (the variable is read here only)."""
from __future__ import annotations

import os
import signal
import time

from hvfm.data import decode

FAULTS: dict = {}
ENV = "HVFM_TEST_DECODE_FAULT"


def parse(spec):
    """"hang:a.mp4,crash:b.mp4" -> {"a.mp4": "hang", "b.mp4": "crash"}."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        kind, _, name = item.partition(":")
        if kind not in ("hang", "crash") or not name:
            raise ValueError(f"{ENV}: {item!r}; write hang:NAME or crash:NAME")
        out[name] = kind
    return out


def fault(name):
    kind = FAULTS.get(name)
    if kind == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            time.sleep(3600)
    if kind == "crash":
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)


def file_request(args, rng):
    fault(os.path.basename(str(args[0])))
    return decode.decode_file_request(args, rng)


def sample_request(args, rng):
    from hvfm.data.loading.shards import decode_sample_request
    fault(str(args[-1]).rsplit(":", 1)[-1])  # the name is SHARD_URL:KEY
    return decode_sample_request(args, rng)


def install(spec, monkeypatch=None):
    """Make the decodes of the names in `spec` hang or crash (in the watchdog child). With a
    pytest `monkeypatch` everything is undone at the test's end."""
    faults = parse(spec)
    targets = {"file": f"{__name__}:file_request", "sample": f"{__name__}:sample_request"}
    if monkeypatch is not None:
        monkeypatch.setattr(decode, "WATCHDOG_TARGETS", {**decode.WATCHDOG_TARGETS, **targets})
        monkeypatch.setattr(__import__(__name__), "FAULTS", faults)
    else:
        decode.WATCHDOG_TARGETS.update(targets)
        FAULTS.clear()
        FAULTS.update(faults)
    return faults
