"""gpu_check's report: the stages' JSON and logs in a work folder -> gpu_check.md (the key numbers
first, then a table per stage) and gpu_check_logs.tar.gz (every log and JSON), in the results
folder. profiling/gpu_check.sh runs it after every stage, so a later timeout leaves what the
earlier stages measured; both files are replaced whole (written beside, then renamed).

    python profiling/gpu_summary.py --work WORK --out OUT

WORK holds stages.tsv (one line per stage: name, status, seconds, budget, command; written by
gpu_check.sh), env.json, logs/<stage>.log and what the stages wrote: kernel_errors.json,
step_check.json, tests_*.xml (pytest --junitxml), bench_kernels.json, bench_train.json,
bench_zero.json, bench_data.json, project_epoch.json. A missing or unreadable file is a row that
says so, never an error: this runs after a stage that was cut short.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

MD, TARBALL = "gpu_check.md", "gpu_check_logs.tar.gz"
HEADLINE_DROPS = ("0.5", "0.1:0.5")


def load(work, name):
    try:
        return json.loads((Path(work) / name).read_text())
    except (OSError, ValueError):
        return None


def fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def table(head, rows):
    if not rows:
        return "(nothing measured)"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def stages(work):
    rows = []
    path = Path(work) / "stages.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 5:
                rows.append(dict(name=parts[0], status=parts[1], seconds=parts[2], budget=parts[3],
                                 command=parts[4]))
    return rows


# ------------------------------------------------------------------------------------ per stage

def kernel_errors(d):
    """(key lines, table) of kernel_errors.json."""
    if not d or not d.get("results"):
        return [], None
    rows, key = [], []
    by_dtype = {}
    for r in d["results"]:
        worst = max(r["errors"].items(), key=lambda kv: kv[1]["triton"])
        ratios = [e["ratio"] for e in r["errors"].values() if e["ratio"] is not None]
        rows.append([r["case"], r["dtype"], "yes" if r["causal"] else "no",
                     f"{max(r['q_lens'])}/{max(r['k_lens'])}",
                     *(f"{r['errors'][k]['triton']:.2e} ({r['errors'][k]['torch']:.2e})" for k in ("out", "dq", "dk", "dv")),
                     "ok" if r["ok"] else "FAIL"])
        b = by_dtype.setdefault(r["dtype"], dict(err=0.0, ratio=0.0, cases=0, ok=0, worst=None))
        b["cases"] += 1
        b["ok"] += int(r["ok"])
        if worst[1]["triton"] >= b["err"]:
            b["err"], b["worst"] = worst[1]["triton"], f"{r['case']} {worst[0]}"
        b["ratio"] = max([b["ratio"], *ratios])
    for dt, b in by_dtype.items():
        key.append(f"kernel max error vs float64, {dt}: {b['err']:.2e} ({b['worst']}); worst ratio to "
                   f"torch's own {dt} error {b['ratio']:.2f}x; {b['ok']}/{b['cases']} cases ok"
                   + ("" if d.get("complete") else " (cut short)"))
    t = table(["case", "dtype", "causal", "max Lq/Lk", "out: triton (torch)", "dq", "dk", "dv", "verdict"], rows)
    return key, t + f"\n\nmax |error| against float64; {d.get('criterion', '')}" + (
        "; interpreted on a CPU (fp32): the code path, not the GPU's rounding" if d.get("interpreted") else "")


def step_check(d):
    if not d:
        return [], None
    if not d.get("checks"):
        return [f"step check: started ({d.get('mode')}) but did not finish"], None
    loss = [c for c in d["checks"] if c["what"].startswith("loss")]
    grad = [c for c in d["checks"] if c["what"].startswith("grad")]
    rel = lambda cs: max(c["diff"] / max(abs(c["unfused"]), 1e-12) for c in cs)  # noqa: E731
    key = [f"fused vs unfused first step ({d['mode']}, {d.get('precision')}): "
           f"{'PASS' if d['ok'] else 'FAIL'}; losses within {rel(loss):.2e} relative, gradient norms "
           f"within {rel(grad):.2e} (tolerance: {d.get('tolerance')})"]
    if d.get("first_step_overhead_s") is not None:
        key.append(f"fused first step {d['fused_step_s'][0]:.1f} s against {d['fused_step_s'][-1]:.2f} s "
                   f"later: {d['first_step_overhead_s']:.1f} s of compiles + autotuning")
    tune = d.get("autotune")
    if tune and tune.get("keys"):
        key.append(f"fused first step: Triton compile + autotune {tune['seconds']:.1f} s over {tune['keys']} "
                   f"kernel keys ({tune['tuned']} tuned, {tune['disk']} from the disk cache)")
    rows = [[c["what"], c["fused"], c["unfused"], c["diff"], c["bound"], "ok" if c["ok"] else "FAIL"]
            for c in d["checks"]]
    cfg = d.get("config", {})
    note = (f"{d['mode']} mode ({d.get('why_mode')}); {cfg.get('model')}, {cfg.get('frames')} frames x "
            f"{cfg.get('size')} px, batch {cfg.get('batch_size')}, drop {cfg.get('drop')}; fused "
            f"{cfg.get('fused')} vs unfused {cfg.get('unfused')}; same video tokens: {d.get('same_tokens')}")
    return key, table(["quantity", "fused", "unfused", "|diff|", "bound", "verdict"], rows) + "\n\n" + note


def bench_kernels(d):
    if not d or not d.get("results"):
        return [], None
    res = d["results"]
    rows = [[r["kernel"], r["case"], r["impl"], r["mode"], r["ms"], r["tflops"]] for r in res]
    key = []
    for case in sorted({r["case"] for r in res if r["kernel"] == "attention"}):
        rate = {r["impl"]: r["tflops"] for r in res if r["case"] == case and r["mode"] == "fwd+bwd"}
        tri = rate.get("triton")
        if tri is None:
            continue
        others = [f"{impl} {v:.0f} ({tri / v:.2f}x)" for impl, v in rate.items()
                  if impl != "triton" and ("varlen" in impl or "sdpa" in impl)]
        key.append(f"attention {case} fwd+bwd: triton {tri:.0f} TFLOP/s; " + (", ".join(others) or "no baseline"))
    t = table(["kernel", "case", "impl", "mode", "ms", "TFLOP/s"], rows)
    return key, t + ("\n\ninterpreted on a CPU: these times mean nothing" if d.get("interpreted") else "")


def bench_train(d):
    if not d or not d.get("results"):
        return [], None
    rows, key = [], []
    for r in d["results"]:
        f, u, c = r["fused"], r["unfused"], r["ratio"]
        rows.append([r["drop"], f["tokens_per_s"], u["tokens_per_s"], f"{c['speedup']:.2f}x",
                     f"{100 * f['mfu']:.1f}%" if f.get("mfu") is not None else None,
                     f"{100 * u['mfu']:.1f}%" if u.get("mfu") is not None else None,
                     f.get("peak_mem_gib"), u.get("peak_mem_gib"), f["step_ms"], u["step_ms"]])
        if str(r["drop"]) in HEADLINE_DROPS:
            mfu = f"MFU {100 * f['mfu']:.1f}%" if f.get("mfu") is not None else "MFU -"
            key.append(f"drop {r['drop']}: fused {f['tokens_per_s']:.0f} tokens/s vs unfused "
                       f"{u['tokens_per_s']:.0f}: {c['speedup']:.2f}x; fused {mfu}, peak "
                       f"{fmt(f.get('peak_mem_gib'))} GiB (unfused {fmt(u.get('peak_mem_gib'))} GiB)")
    first = (d.get("first_step") or {}).get("fused")
    if first:
        tune = (f"; Triton compile + autotune {first['autotune_s']:.1f} s over {first['autotune_keys']} kernel "
                f"keys ({first['autotune_disk']} from the disk cache)" if first.get("autotune_keys") else "")
        key.append(f"bench_train fused engine's first step {first['step_s']:.1f} s{tune}")
    for x in (d.get("extras") or {}).get("rows", []):
        v = x["vs_base"]["fused"]
        key.append(f"extras at drop {d['extras'].get('drop')}: reverse {x['reverse']:g}, motion "
                   f"{'on' if x['motion'] else 'off'}: fused {x['fused']['samples_per_s']:.1f} samples/s, "
                   f"{v['throughput']:.2f}x the base setting")
    cfg = d.get("config", {})
    note = (f"{cfg.get('preset')}, {cfg.get('frames')} frames x {cfg.get('size')} px, batch {cfg.get('batch')}; "
            f"{d.get('precision')}, {d.get('zero')}; fused {d['variants']['fused']} vs unfused "
            f"{d['variants']['unfused']}; {d.get('device_name')}" + ("" if d.get("complete") else "; cut short"))
    return key, table(["drop", "fused tokens/s", "unfused tokens/s", "speedup", "fused MFU", "unfused MFU",
                       "fused peak GiB", "unfused peak GiB", "fused ms/step", "unfused ms/step"], rows) + "\n\n" + note


def bench_zero(d):
    if not d or not d.get("results"):
        return [], None
    rows, key = [], []
    for r in d["results"]:
        if not r.get("ok"):
            rows.append([r.get("config"), r.get("checkpointing"), "failed", None, None, None, None, None])
            continue
        rows.append([r["config"], r["checkpointing"], r["step_ms"], r["params_mib"], r["grads_mib"],
                     r["optimizer_mib"], r["model_states_mib"], r["peak_mem_gib"]])
        if r["config"] == "z2":
            key.append(f"ZeRO-2 ({d.get('world_size')} rank(s), checkpointing {'on' if r['checkpointing'] else 'off'}): "
                       f"{r['step_ms']:.0f} ms/step, model states {r['model_states_mib']:.0f} MiB, peak "
                       f"{r['peak_mem_gib']:.2f} GiB, {r['parameters'] / 1e6:.0f}M parameters")
    return key, table(["config", "checkpointing", "step ms", "params MiB", "grads MiB", "optimizer MiB",
                       "model states MiB", "peak GiB"], rows)


def bench_data(d):
    if not d or not d.get("results"):
        return [], None
    rows = [[r["source"], r["workers"], r["clips"], r["clips_per_s"], r["clips_per_s_per_worker"]]
            for r in d["results"]]
    return [], table(["source", "workers", "clips", "clips/s", "clips/s per worker"], rows)


def project_epoch(d):
    if not d or not d.get("results"):
        return [], None
    rows = [[r["drop"], r["gpus"], r["train_clips_per_s"], r["decode_clips_per_s"], r["bound"],
             r["epoch_hours"], r.get("unfused_epoch_hours")] for r in d["results"]]
    key = [f"one WebVid-10M epoch, drop {r['drop']} on {r['gpus']} GPU(s): {r['epoch_hours']:.1f} h "
           f"({r['bound']}-bound)" for r in d["results"] if str(r["drop"]) == "0.5" and r["gpus"] in (1, 8)]
    note = f"training rates: {d.get('train_source')}; decode rate: {d.get('decode_source')}"
    return key, table(["drop", "GPUs", "train clips/s", "decode clips/s", "bound", "epoch h",
                       "unfused epoch h"], rows) + "\n\n" + note


def junit(work, stage):
    """(key lines, table) of a pytest --junitxml file: counts and the failing tests."""
    path = Path(work) / f"{stage}.xml"
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return [], None
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                bad.append([f"{case.get('classname')}::{case.get('name')}", tag, msg])
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    key = [f"{stage}: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"]
    return key, key[0] + ("\n\n" + table(["test", "kind", "message"], bad) if bad else "")


def env(work):
    d = load(work, "env.json")
    if not d:
        return []
    return [f"{d.get('gpu') or 'no GPU'}; torch {d.get('torch')} (CUDA {d.get('cuda')}), triton "
            f"{d.get('triton')}, python {d.get('python')}; missing modules: {', '.join(d.get('missing') or []) or 'none'}"]


READERS = {"kernel_errors": ("kernel_errors.json", kernel_errors), "step_check": ("step_check.json", step_check),
           "bench_kernels": ("bench_kernels.json", bench_kernels), "bench_train": ("bench_train.json", bench_train),
           "bench_zero": ("bench_zero.json", bench_zero), "bench_data": ("bench_data.json", bench_data),
           "project_epoch": ("project_epoch.json", project_epoch)}


def report(work, title=None):
    work = Path(work)
    st = stages(work)
    key, sections = [], []
    for s in st:
        name = s["name"]
        if name in READERS:
            k, t = READERS[name][1](load(work, READERS[name][0]))
        elif name.startswith("tests_"):
            k, t = junit(work, name)
        else:
            k, t = [], None
        key += k
        body = t if t is not None else "(no results: see the stage's status and its log in the tarball)"
        sections.append(f"## {name}: {s['status']}\n\n`{s['command']}`\n\n{body}")
    head = env(work)
    lines = [f"# {title or 'gpu_check'}", "", f"written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
             f"logs and JSON of every stage in {TARBALL}", ""]
    lines += ["## Key numbers", ""] + [f"- {x}" for x in head + key] + (["- (none yet)"] if not head + key else [])
    lines += ["", "## Stages", "",
              table(["stage", "status", "seconds", "budget s"],
                    [[s["name"], s["status"], s["seconds"], s["budget"]] for s in st]), ""]
    lines += ["\n\n".join(sections), ""]
    return "\n".join(lines)


def write(work, out, title=None):
    """gpu_check.md and the tarball into `out`, each written beside and renamed into place."""
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(work, title)
    tmp = out / f".{MD}.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / MD)
    tmp = out / f".{TARBALL}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(Path("gpu_check_logs") / p.relative_to(work)))
        data = md.encode()
        info = tarfile.TarInfo("gpu_check_logs/gpu_check.md")
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out / TARBALL)
    return out / MD


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="the stages' folder (stages.tsv, logs/, JSON)")
    ap.add_argument("--out", required=True, help="where gpu_check.md and the tarball go")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    print(f"wrote {write(args.work, args.out, args.title)}")


if __name__ == "__main__":
    main()
