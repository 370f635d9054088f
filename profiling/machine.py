"""What every benchmark records beside its numbers: the machine, library versions and commit."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "profiling" / "results"
PACKAGES = ("torch", "triton", "deepspeed", "transformers", "decord", "av", "numpy")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name():
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def commit():
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "gpu": gpu_name(),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions, "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe(info):
    device = info["gpu"] or f"{info['cpu']} ({info['cpu_cores']} cores, no GPU)"
    v = info["versions"]
    return (f"{device}; torch {v['torch']}, triton {v.get('triton')}, deepspeed {v.get('deepspeed')}, "
            f"decord {v['decord']}, av {v['av']}; commit {info['commit']}")


def portable(obj, roots=(ROOT,)):
    """`obj` (JSON-like) with no absolute path of this machine in its strings: a path in the
    repository (any of `roots`) becomes relative to it, one in the temporary folder `<tmp>/...`,
    in HVFM_CACHE `<HVFM_CACHE>/...`, in the home folder `~/...`. Results are committed and read
    on other machines, where those paths mean nothing."""
    if isinstance(obj, dict):
        return {k: portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, roots) for v in obj]
    if not isinstance(obj, str) or "/" not in obj:
        return obj
    import tempfile
    places = [(str(r), "") for r in roots]
    if os.environ.get("HVFM_CACHE"):
        places.append((os.environ["HVFM_CACHE"].rstrip("/"), "<HVFM_CACHE>/"))
    places += [(tempfile.gettempdir(), "<tmp>/"), ("/tmp", "<tmp>/"), (str(Path.home()), "~/")]
    for place, instead in places:  # the place followed by "/", or the place itself
        obj = re.sub(rf"(?<![\w.-]){re.escape(place)}(/|(?=[\s\"'`,;:)\]]|$))",
                     lambda m: instead if m.group(1) else instead.rstrip("/") or ".", obj)
    return obj


def write_json(path, payload):
    """`payload` as indented JSON, with machine paths made `portable`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(payload), indent=2) + "\n")
    return path


# ------------------------------------------------------------------ shared by the suite's scripts

def rss_bytes(field="VmRSS"):
    """This process's resident set (VmRSS) or its peak (VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field == "VmHWM":
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak if sys.platform == "darwin" else peak * 1024
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that
    the peak of one phase can be read alone. False where that is not allowed: the peak is then
    the process's since it started (getrusage's ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def nvml_used_bytes(index=0):
    """Device memory in use on GPU `index` as the driver sees it (all processes, the caching
    allocator's reserve included), via nvidia-ml-py; None when pynvml or the GPU is missing."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - not installed, no driver, no device
        return None


def markdown_table(headers, rows):
    """A GitHub markdown table; cells are formatted already (str) or numbers (3 significant)."""
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e3 else f"{x:,.0f}"
        return str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path, title, info, body, notes=()):
    """`# title`, the machine line, the tables/text in `body`, then bullet notes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\nMachine: {describe(info)}; {info['date']}\n\n{body.strip()}\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    path.write_text(portable(text))
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (and one line saying so) when
    matplotlib is not installed: every script then still writes its JSON and markdown."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plots (pip install matplotlib); "
              "the JSON and markdown tables are complete without them")
        return None


def run_logged(cmd, log, env=None, timeout=None):
    """Run `cmd` in the repository root with stdout+stderr to the file `log`; returns the exit
    code, or "timeout" when it ran past `timeout` seconds (the child is killed)."""
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return "timeout"
