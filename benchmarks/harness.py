"""Family-independent benchmark machinery: timing, records, table, JSON/Markdown/PNG.

A family module (benchmarks/dense.py, ...) only describes *what* to run: a
list of Case objects, each of which builds its Variants when it is run (so the
inputs of one case are freed before the next one allocates its own).
"""

import ctypes
import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

SUBJECT = "bigkernels"  # the variant every other variant is compared against
PASSES = ("fwd", "fwd+bwd")


@dataclass
class Variant:
    fn: Callable[[], torch.Tensor]  # runs the forward, returns the output
    wrt: tuple = ()  # tensors the backward differentiates with respect to
    backward: bool = True  # False: fwd+bwd is recorded as "n/a"
    note: str = ""


@dataclass
class Case:
    family: str
    name: str
    params: dict
    flops: float  # forward FLOPs
    make: Callable[[], dict]  # -> {variant name: Variant}, built only when the case runs
    backward_flops_factor: float = 2.0  # backward = this x forward (dense: two GEMMs of the same size)
    # Calls per timed sample, which then records their mean: for calls of a few
    # microseconds, where one call is too short to time alone.
    calls_per_sample: int = 1
    # Samples taken even past the time budget: more for calls of a second or
    # less whose ratio this shared host moves by a third between runs.
    min_samples: int = 3
    # Measure each variant's peak memory on the CPU too (one more run of
    # each; on CUDA it is always measured), and show it in the table.
    measure_memory: bool = False
    # The fewest bytes a forward must move (memory-bound kernels: decoding),
    # 0 when not counted: the table then shows the subject's GB/s.
    bytes: float = 0.0


# ---------------------------------------------------------------- timing

def _timer(device):
    """Returns time_once(fn) -> ms. CUDA events time the GPU work, not the
    launch; the CPU path times the call itself."""
    if device == "cuda":
        def time_once(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def time_once(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return time_once


def _step(variant, pass_, device):
    """The callable that is timed for one pass."""
    if pass_ == "fwd":
        def fwd():
            with torch.no_grad():  # inference: nothing saved for backward
                variant.fn()
        return fwd
    with torch.no_grad():
        shape_of = variant.fn()
    # A fixed random upstream gradient (the same seed for every variant), so
    # no activation sees an all-ones gradient it could special-case.
    gen = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(shape_of.shape, generator=gen, device=device).to(shape_of.dtype)
    del shape_of

    def fwd_bwd():
        # autograd.grad instead of .backward(): nothing accumulates into .grad.
        torch.autograd.grad(variant.fn(), variant.wrt, grad)
    return fwd_bwd


def _error(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def _repeated(step, calls):
    """step run `calls` times in a row (one timed sample)."""
    if calls == 1:
        return step

    def many():
        for _ in range(calls):
            step()
    return many


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    """glibc's mallinfo2 (2.33+), looked up once, or None elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


def _malloc_in_use():
    """Bytes malloc has handed out and not taken back (heap blocks in use
    plus mapped blocks), or None where glibc cannot say. torch's CPU tensors
    come from malloc."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def _cpu_peak_mib(step):
    """The most memory in use during one run of step above what was in use
    before it, in MiB, sampled every 0.5 ms from a second thread (torch's ops
    release the GIL), or None where malloc cannot say. The resident size
    would not do: memory freed by one variant and reused by the next counts
    there as nothing new."""
    base = _malloc_in_use()
    if base is None:
        return None
    top, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            top[0] = max(top[0], _malloc_in_use())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        step()
    finally:
        stop.set()
        sampler.join()
    return (max(top[0], _malloc_in_use()) - base) / 2**20


def measure_pass(variants, pass_, device, warmup, repeats, budget_s, calls=1, min_samples=3, cpu_memory=False):
    """-> {name: (status, median ms per call, samples, peak MiB or None, message)}.

    The variants take turns, one timed run each per round, so that a slow
    spell of a shared or throttled machine hits them all alike. Never raises,
    never asserts: a failing variant becomes an "error" result."""
    results, steps = {}, {}
    for name, variant in variants.items():
        if pass_ == "fwd+bwd" and not variant.backward:
            results[name] = ("n/a", None, 0, None, variant.note or "no backward")
            continue
        try:
            step = _repeated(_step(variant, pass_, device), calls)
            for _ in range(warmup):
                step()
            steps[name] = step
        except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
            results[name] = ("error", None, 0, None, _error(e))
    time_once = _timer(device)
    times = {name: [] for name in steps}
    t_end = time.perf_counter() + budget_s * max(1, len(steps))
    # Stop early once the time budget is spent (keeps slow CPU cases bounded),
    # but always take at least min_samples (3: a meaningful median).
    # Each round in a new order (seeded): every variant follows every other
    # about equally often. (With the first place rotating, of three variants
    # one followed the math backend, which evicts the caches, in 2 rounds of
    # 3: 0.77x against 1.1-1.2x in fair interleaving for a 0.15 ms call.)
    order = random.Random(0)
    for round_ in range(max(repeats, min_samples)):
        if round_ >= min_samples and time.perf_counter() > t_end or not steps:  # (none: every variant n/a or failed)
            break
        names = list(steps)
        order.shuffle(names)
        for name in names:
            try:
                times[name].append(time_once(steps[name]) / calls)
            except Exception as e:  # noqa: BLE001
                results[name] = ("error", None, 0, None, _error(e))
                del steps[name]
    for name in steps:
        peak = None
        if device == "cuda":  # peak memory of this variant alone, on top of the live inputs
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            steps[name]()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif cpu_memory:
            peak = _cpu_peak_mib(steps[name])
        results[name] = ("ok", statistics.median(times[name]), len(times[name]), peak, "")
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- running

def run_case(case, device, warmup, repeats, budget_s, log, skip=()):
    """Measures every variant x pass of one case (but those named in skip);
    returns its records."""
    records = []
    try:
        variants = {name: v for name, v in case.make().items() if name not in skip}
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory for the inputs
        log(f"  setup failed: {type(e).__name__}: {e}")
        return records
    for pass_ in PASSES:
        measured = measure_pass(variants, pass_, device, warmup, repeats, budget_s, case.calls_per_sample,
                                case.min_samples, case.measure_memory)
        for vname, variant in variants.items():
            status, ms, n, peak, msg = measured[vname]
            flops = case.flops * (1 + case.backward_flops_factor if pass_ == "fwd+bwd" else 1)
            gbps = case.bytes / (ms * 1e-3) / 1e9 if ms and case.bytes and pass_ == "fwd" else None
            records.append(dict(
                family=case.family, case=case.name, params=case.params, variant=vname, pass_=pass_,
                status=status, median_ms=ms, samples=n,
                tflops=flops / (ms * 1e-3) / 1e12 if ms else None, gbps=gbps,
                peak_mem_mib=peak, show_memory=case.measure_memory, note=msg or variant.note,
            ))
            shown = f"{_fmt_ms(ms):>10} ms" if ms is not None else f"{status:>13}"
            log(f"  {pass_:7} {vname:17} {shown}  {msg}".rstrip())
    del variants
    # speed-up of the subject over each baseline: baseline_ms / subject_ms
    for pass_ in PASSES:
        same = [r for r in records if r["pass_"] == pass_]
        subj = next((r["median_ms"] for r in same if r["variant"] == SUBJECT), None)
        for r in same:
            r["speedup"] = r["median_ms"] / subj if subj and r["median_ms"] else None
    return records


def cpu_has_native_bf16():
    """Whether the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16,
    ARM BF16), which ATen's bf16 GEMM needs to be fast."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if limit != "ALL" and "BF16" not in limit and "AMX" not in limit:
        return False  # oneDNN, which runs ATen's bf16 GEMMs, was told not to use it
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def machine_info(device):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import bigkernels
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else cpu,
        cpu_model=cpu, cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
        cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_native_bf16=cpu_has_native_bf16(),
        # variables that lower the instruction set of ATen, oneDNN and MKL (to measure an older CPU)
        isa_env={k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                 if k in os.environ},
        bigkernels=bigkernels.backend_info(), command=" ".join(["python -m benchmarks"] + sys.argv[1:]),
    )
    return info


# ---------------------------------------------------------------- reporting

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _fmt_ms(ms):
    """Three decimals, or three significant digits below 0.1 ms (host overhead cases)."""
    return _fmt(ms, ".3f" if ms is None or ms >= 0.1 else ".3g")


def table_rows(records):
    """One row per case x pass: each variant's median ms, the subject's
    TFLOP/s, and its speed-up over each other variant."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    baselines = [v for v in variants if v != SUBJECT]
    memory = any(r.get("show_memory") for r in records)  # peak MiB per variant too
    bandwidth = any(r.get("gbps") for r in records)  # the subject's GB/s too
    header = (["case", "pass"] + [f"{v} ms" for v in variants] + [f"{SUBJECT} TFLOP/s"]
              + ([f"{SUBJECT} GB/s"] if bandwidth else [])
              + [f"x {v}" for v in baselines] + ([f"{v} peak MiB" for v in variants] if memory else []))
    rows = []
    for key in dict.fromkeys((r["case"], r["pass_"]) for r in records):
        got = {r["variant"]: r for r in records if (r["case"], r["pass_"]) == key}
        cell = lambda v: (_fmt_ms(got[v]["median_ms"]) if got[v]["status"] == "ok"  # noqa: E731
                          else got[v]["status"]) if v in got else "-"
        subj = got.get(SUBJECT, {})
        speed = lambda v: _fmt(got[v].get("speedup"), ".2f") if v in got else "-"  # noqa: E731
        peak = lambda v: _fmt(got[v].get("peak_mem_mib"), ".0f") if v in got else "-"  # noqa: E731
        rows.append(list(key) + [cell(v) for v in variants] + [_fmt(subj.get("tflops"), ".3f")]
                    + ([_fmt(subj.get("gbps"), ".1f")] if bandwidth else [])
                    + [speed(v) for v in baselines] + ([peak(v) for v in variants] if memory else []))
    return header, rows


def format_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731 -- text left, numbers right
        str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown(info, header, rows, records):
    out = [
        "# bigkernels benchmark", "",
        f"{info['date']} on {info['device']} ({info['device_name']}), torch {info['torch']}, "
        f"bigkernels {info['bigkernels'].get('version')}; CPU capability {info['cpu_capability']}"
        + (f" ({', '.join(f'{k}={v}' for k, v in info['isa_env'].items())})" if info["isa_env"] else "")
        + f", {info['torch_threads']} threads.", "",
        "Median ms; TFLOP/s counts dense 2·M·K·N_rows per forward (3x for fwd+bwd), attention "
        "4·B·H·L·S·D (halved when causal; 3.5x for fwd+bwd); overhead cases time a call on tiny tensors "
        "(the mean of 100 calls per sample); losses 2·N·D·V (3x for fwd+bwd); "
        "GB/s (where shown): the bytes a forward must read (decode: K and V) over its time; "
        f"x <variant> = that variant's ms / {SUBJECT} ms (>1: {SUBJECT} is faster); peak MiB (where shown): "
        "the memory a run adds above its live inputs, at its peak (CPU: malloc's bytes in use, sampled every "
        "0.5 ms).", "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    notes = sorted({f"{r['variant']} {r['pass_']}: {r['note']}" for r in records
                    if r["status"] != "ok" and r["note"]})
    if notes:
        out += ["", "Not measured:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _write(path, text):
    """Write-then-rename, so an interrupted run never leaves a half file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot(records, path):
    """The subject's speed-up against each baseline, one panel per family:
    a row per case and pass, a bar per baseline, a log scale centred on the
    1.0x line (losing bars hatched, so they show at a glance). Skipped
    silently without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in records if r["variant"] != SUBJECT and r.get("speedup")]
    families = list(dict.fromkeys(r["family"] for r in ok))
    if not families:
        return None
    rows_of = {f: list(dict.fromkeys((r["case"], r["pass_"]) for r in ok if r["family"] == f)) for f in families}
    heights = [max(2.0, 0.22 * len(rows_of[f]) * len({r["variant"] for r in ok if r["family"] == f}) + 1.0)
               for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights))
    colours = {}
    for ax, family in zip(axes[:, 0], families):
        keys = rows_of[family]
        baselines = list(dict.fromkeys(r["variant"] for r in ok if r["family"] == family))
        height = 0.8 / len(baselines)
        for i, b in enumerate(baselines):
            vals = {(r["case"], r["pass_"]): r["speedup"] for r in ok if r["variant"] == b and r["family"] == family}
            ys = [k + i * height for k, key in enumerate(keys) if key in vals]
            xs = [vals[key] for key in keys if key in vals]
            colour = colours.setdefault(b, f"C{len(colours)}")
            # bars grow from the 1.0x line: right when faster, left (and hatched) when slower
            ax.barh(ys, [x - 1 for x in xs], height, left=1, label=f"vs {b}", color=colour, edgecolor="none")
            ax.barh([y for y, x in zip(ys, xs) if x < 1], [x - 1 for x in xs if x < 1], height, left=1,
                    color="none", edgecolor="red", hatch="///", lw=0)
        ax.axvline(1.0, color="k", lw=1.2)
        ax.set_xscale("log", base=2)
        speedups = [r["speedup"] for r in ok if r["family"] == family]
        lo, hi = min(0.5, min(speedups) / 1.15), max(2.0, max(speedups) * 1.15)
        ax.set_xlim(lo, hi)
        fine = (0.5, 0.67, 0.8, 1, 1.25, 1.5, 2)  # readable only on a narrow range
        ticks = [t for t in (fine if hi / lo <= 8 else [2.0 ** e for e in range(-6, 7)]) if lo <= t <= hi]
        ax.set_xticks(ticks, [f"{t:.2g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(keys))])
        ax.set_yticklabels([f"{c}  [{p}]" for c, p in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{family}: speed-up of {SUBJECT} (baseline ms / {SUBJECT} ms; > 1: faster; red hatching: slower)",
                     fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tflops_by_seqlen(records, path):
    """TFLOP/s against sequence length, one line per variant, one panel per
    attention configuration (head dim, causal) and pass; None when no
    configuration was measured at two lengths or more."""
    ok = [r for r in records if r["family"] == "attention" and r.get("tflops")]
    panels = {}
    for r in ok:  # B and H change with L (a fixed token count): the panel is the rest
        key = (r["params"]["D"], r["params"]["causal"], r["params"]["dtype"], r["pass_"])
        panels.setdefault(key, []).append(r)
    # a panel is a sweep at a fixed token count B·L (the GPU cases), not the CPU's matrix of models
    panels = {k: rs for k, rs in panels.items() if len({r["params"]["L"] for r in rs}) >= 2
              and len({r["params"]["B"] * r["params"]["L"] for r in rs}) == 1}
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted(panels, key=str)
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for variant in dict.fromkeys(r["variant"] for r in panels[key]):
            pts = sorted((r["params"]["L"], r["tflops"]) for r in panels[key] if r["variant"] == variant)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant,
                    lw=2.5 if variant == SUBJECT else 1.2)
        D, causal, dtype, pass_ = key
        ax.set_title(f"{dtype} D{D}{' causal' if causal else ''} {pass_}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir, info, records):
    """results.json, report.md and (with matplotlib) speedup.png and, for
    attention over several lengths, attention_tflops.png; returns the printed table."""
    os.makedirs(out_dir, exist_ok=True)
    header, rows = table_rows(records)
    # "pass_" avoids the keyword in Python; the files say "pass".
    clean = [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in records]
    _write(os.path.join(out_dir, "results.json"),
           json.dumps(dict(machine=info, records=clean), indent=1) + "\n")
    _write(os.path.join(out_dir, "report.md"), markdown(info, header, rows, records))
    for name, draw in (("speedup.png", plot), ("attention_tflops.png", plot_tflops_by_seqlen)):
        try:
            draw(records, os.path.join(out_dir, name))
        except ImportError:
            pass  # no matplotlib: the plots are skipped, the data is written
        except Exception as e:  # noqa: BLE001 -- a plot is a nicety; the data is already written
            print(f"{name} not written: {type(e).__name__}: {e}", flush=True)
    return format_table(header, rows)
