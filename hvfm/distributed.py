"""Process-group plumbing of the trainer: joining the group, object collectives, quieting the
libraries, and the clean-up DeepSpeed leaves to its user."""
from __future__ import annotations

import os
import socket


def quiet_libraries():
    """Hide the libraries' progress bars and info lines (transformers' "Loading weights", the
    hub's "Writing model shards", DeepSpeed's engine and optimizer reports); warnings and errors
    still show. --verbose skips this."""
    import logging
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


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
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


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

