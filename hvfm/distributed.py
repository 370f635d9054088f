"""Process-group plumbing of the trainer: joining the group, object collectives, quieting the
libraries, and the clean-up DeepSpeed leaves to its user."""
from __future__ import annotations

import contextlib
import os
import re
import socket


QUIET = {"on": False}  # set by quiet_libraries: init_distributed then hides DeepSpeed's build line

# What quiet_libraries hides of DeepSpeed's own logger (its other warnings show): ZeRO-3's note that
# it cannot see the tensors inside a module's output object (hvfm's VideoOutput), so that module's
# own backward hooks may not fire; the layers inside it return tensors and theirs do (the ZeRO-3
# runs of tests/test_train.py and tests/test_export_deepspeed.py train, resume and export to the
# same scores)
DEEPSPEED_HIDDEN = ("A module has unknown inputs or outputs type",)
# What init_distributed hides of its stdout: printed once per rank when DeepSpeed JIT-loads its CPU
# shared-memory all-reduce (deepspeed/comm/torch.py build_shm_op)
INIT_HIDDEN = re.compile(r"^DeepSpeed \S+ built successfully$")
# Deprecations raised inside these libraries (ZeRO-3's torch.distributed.all_gather_into_tensor /
# reduce_scatter_tensor calls, reported from torch/distributed/c10d_logger.py): theirs to fix, not
# the user's
FUTURE_WARNING_MODULES = r"(torch\.distributed|deepspeed)(\.|$)"


class _DropMessages:
    """logging filter: drops records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes):
        self.prefixes = tuple(prefixes)

    def filter(self, record):
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_libraries():
    """Hide the libraries' progress bars and info lines (transformers' "Loading weights", the
    hub's "Writing model shards", DeepSpeed's engine and optimizer reports), DeepSpeed's line
    about building its CPU comm op, the FutureWarnings raised inside torch.distributed and
    DeepSpeed (ZeRO-3's deprecated collectives) and ZeRO-3's note on module outputs
    (`DEEPSPEED_HIDDEN`); other warnings and errors still show. --verbose skips this.
    The deepspeed launcher's own lines come from the launcher process, before this runs:
    `deepspeed -q` hides them (README, "Quiet by default")."""
    import logging
    import warnings
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropMessages) for f in ds_logger.filters):
        ds_logger.addFilter(_DropMessages(DEEPSPEED_HIDDEN))
    warnings.filterwarnings("ignore", category=FutureWarning, module=FUTURE_WARNING_MODULES)
    QUIET["on"] = True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cuda):
    """Join (or make) the process group. On GPUs each rank is bound to cuda:LOCAL_RANK first:
    NCCL's object collectives (broadcast_object_list, all_gather_object) stage their bytes on
    the *current* device, which without this is cuda:0 on every rank while DeepSpeed puts the
    rank's model on cuda:LOCAL_RANK -- a hang or a crash at the first collective."""
    import deepspeed
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ:  # plain `python hvfm/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    with _hidden_stdout(INIT_HIDDEN if QUIET["on"] else None):
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def _hidden_stdout(pattern):
    """Within the block, stdout lines matching `pattern` are dropped; the others are printed
    after it (also when it raises). `pattern` None: stdout untouched."""
    import io
    import sys
    if pattern is None:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [line for line in buf.getvalue().splitlines() if not pattern.match(line)]
        if kept:
            print("\n".join(kept), flush=True, file=sys.stdout)


def broadcast(obj):
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj):
    import torch.distributed as dist
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def remove_shm_buffer():
    """DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_* (about
    70 MB per rank and master port) behind at exit; remove this rank's. Only after the final
    barrier: the other ranks open it by name while they initialise."""
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if addr and port and rank and hasattr(os, "getuid"):
        try:
            os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
        except OSError:
            pass



# ----------------------------------------------------------------------------- one error ends every rank

class ErrorWatch:
    """An error that one rank alone raises ends every rank within seconds, each printing the same
    line, instead of leaving the others blocked in a collective until NCCL's 30-minute time-out.

    Every rank runs a daemon thread that polls a key of the rendezvous store (the TCPStore at
    MASTER_ADDR:MASTER_PORT that the ranks met through; a store call is a few bytes over TCP, no
    device sync, every `poll_s`). The failing rank `fail`s: it writes its line under the key (the
    first error written wins: compare-and-set), prints it, and waits until every rank has
    printed it (a counter in the store, at most `grace_s`) before it exits, so that no launcher
    kills a rank before it has said why. The others' threads find the key, print the same line,
    count themselves and exit with the same code (os._exit: their main thread may be blocked in
    a collective). A store that stops answering means rank 0's process is gone (it hosts the
    store under the deepspeed launcher): the others exit too, naming that. `stop()` before a
    collective ending (the final barrier) so that a rank 0 that finishes first is not taken for
    a dead one."""

    def __init__(self, store, rank, world, poll_s=0.5, grace_s=10.0, exit=None, where="", out=None):
        import sys
        import threading
        self.store, self.rank, self.world, self.poll_s, self.grace_s = store, rank, world, poll_s, grace_s
        self.exit = exit or os._exit
        self.where, self.out = where, out or sys.stderr
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts: a fresh key
        self.key = f"hvfm/error/{attempt}"
        self.seen_key = f"hvfm/error_seen/{attempt}"
        self.left_key = f"hvfm/error_left/{attempt}"
        self.on_exit = []  # callables(code) run before this rank exits through the watch
        self.stopping = threading.Event()
        self.claim = threading.Lock()  # the main thread's fail() or the watcher: whichever comes first
        self.thread = threading.Thread(target=self._watch, name="hvfm-error-watch", daemon=True)

    @classmethod
    def connect(cls, rank, world, **kwargs):
        """A watch on the rendezvous store of this run (MASTER_ADDR:MASTER_PORT), started; None
        when there is nothing to watch (one rank) or the store cannot be reached (a warning)."""
        import datetime
        import sys
        import torch.distributed as dist
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world < 2 or not addr or not port:
            return None
        timeout = kwargs.get("grace_s", 10.0)
        try:
            store = dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001 - no watch, the run goes on as before
            print(f"warning: no error watch ({type(e).__name__}: {e}); an error on one rank may leave the "
                  f"others waiting for the collective time-out", file=sys.stderr, flush=True)
            return None
        watch = cls(store, rank, world, where=f"{addr}:{port}", **kwargs)
        watch.thread.start()
        return watch

    def _watch(self):
        while not self.stopping.wait(self.poll_s):
            try:
                found = self.store.check([self.key])
            except Exception:  # noqa: BLE001 - the store's host is gone
                if self.stopping.wait(min(2.0, self.grace_s)):  # a normal end racing this poll
                    return
                self._end(1, f"rank {self.rank}: lost the run's store at {self.where}: the process that "
                             f"hosts it (rank 0) is gone; its log says why", ack=False)
                return
            if found:
                value = self.store.get(self.key).decode()
                code, _, line = value.partition("|")
                self._end(int(code), line)
                return

    def _end(self, code, line, ack=True):
        if not self.claim.acquire(blocking=False):  # the main thread is failing this rank already
            return
        self._say(line)
        if ack:
            self._ack_and_wait()
        self._exit(code)

    def _say(self, line):
        """`error: line` on a line of its own (under a live progress bar too)."""
        try:
            from tqdm import tqdm
            tqdm.write(f"error: {line}", file=self.out)
            self.out.flush()
        except Exception:  # noqa: BLE001 - no tqdm, or its lock held: a plain line after a break
            print(f"\nerror: {line}", file=self.out, flush=True)

    def _ack_and_wait(self):
        """Count this rank as told, wait until every rank is (at most `grace_s`); rank 0, whose
        process may host the store, leaves last, once the others have stopped reading it."""
        import time

        def wait(key, n, seconds):
            end = time.monotonic() + seconds
            while self.store.add(key, 0) < n and time.monotonic() < end:
                time.sleep(0.05)
        try:
            self.store.add(self.seen_key, 1)
            wait(self.seen_key, self.world, self.grace_s)
            if self.rank == 0:
                wait(self.left_key, self.world - 1, 2.0)
            else:
                self.store.add(self.left_key, 1)
        except Exception:  # noqa: BLE001 - the store went away: the others were told or are gone
            pass

    def _exit(self, code):
        for hook in self.on_exit:
            try:
                hook(code)
            except Exception:  # noqa: BLE001 - clean-up is best effort on the way out
                pass
        self.exit(code)

    def fail(self, code, line):
        """This rank raised an error the others did not: publish it (or learn the one published
        first), print that line, wait until every rank has, exit with its code. Does not return
        (unless `exit` does, in tests)."""
        import time
        if not self.claim.acquire(blocking=False):  # the watcher is ending this rank already
            time.sleep(self.grace_s + 5)
            return
        self.stopping.set()
        try:
            first = self.store.compare_set(self.key, "", f"{code}|{line}").decode()
            first_code, _, line = first.partition("|")
            code = int(first_code)
        except Exception:  # noqa: BLE001 - no store: say it here at least
            pass
        self._say(line)
        self._ack_and_wait()
        self._exit(code)

    def stop(self):
        """Stop watching (every rank, before the final barrier); waits for the thread."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.poll_s + 5)


WATCH = {"watch": None}  # this process's ErrorWatch, started once by `start_error_watch`


def start_error_watch(rank, world, **kwargs):
    """Start this process's ErrorWatch (once; None with one rank); see ErrorWatch."""
    if WATCH["watch"] is None:
        WATCH["watch"] = ErrorWatch.connect(rank, world, **kwargs)
    return WATCH["watch"]


def stop_error_watch():
    """Stop and forget this process's ErrorWatch; returns it (None if there was none)."""
    watch, WATCH["watch"] = WATCH["watch"], None
    if watch is not None:
        watch.stop()
    return watch


# ----------------------------------------------------------------------------- multi-node environment

# What a multi-node run needs on every node that pdsh does not carry over from the launching
# shell (the deepspeed launcher forwards only NCCL*, PYTHON*, UCX*, MV2*, MLFLOW* variables and
# the ones in a .deepspeed_env file).
DEEPSPEED_ENV_VARS = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HVFM_CACHE", "TRITON_CACHE_DIR",
                      "TORCH_EXTENSIONS_DIR", "TMPDIR")


def deepspeed_env_lines(environ=None, names=DEEPSPEED_ENV_VARS):
    """NAME=VALUE lines of `names` that `environ` sets, in the format the deepspeed launcher reads
    (deepspeed/launcher/runner.py: every line is split at its first "=", so no comments and no
    blank lines; values are stripped and quoted there when they hold other characters than
    [A-Za-z0-9_@%+=:,./-])."""
    environ = os.environ if environ is None else environ
    lines = []
    for name in names:
        value = environ.get(name)
        if value is None:
            continue
        if "\n" in value:
            raise ValueError(f"{name}: a value with a line break cannot go in a .deepspeed_env")
        lines.append(f"{name}={value}")
    return lines


def write_deepspeed_env(path=".deepspeed_env", environ=None, names=DEEPSPEED_ENV_VARS):
    """Write `deepspeed_env_lines` to `path` (replacing it); returns the lines."""
    lines = deepspeed_env_lines(environ, names)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return lines


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(
        prog="python -m hvfm.distributed",
        description="Write a .deepspeed_env for a multi-node run: the deepspeed launcher reads "
                    "~/.deepspeed_env, then ./.deepspeed_env (the folder it is started in; the name "
                    "can be changed with DS_ENV_FILE), and exports every NAME=VALUE line on every "
                    "node, which pdsh would not otherwise carry over.")
    ap.add_argument("--write-deepspeed-env", metavar="PATH", nargs="?", const=".deepspeed_env", required=True,
                    help="the file to write (default: ./.deepspeed_env)")
    ap.add_argument("--vars", default=",".join(DEEPSPEED_ENV_VARS),
                    help="comma-separated names, each written when this shell sets it (default: %(default)s)")
    args = ap.parse_args(argv)
    lines = write_deepspeed_env(args.write_deepspeed_env, names=[v for v in args.vars.split(",") if v])
    print(f"{args.write_deepspeed_env}: {len(lines)} variables ({', '.join(line.split('=', 1)[0] for line in lines)})")


if __name__ == "__main__":
    main()
