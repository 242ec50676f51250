"""python -m benchmarks [--full] [--only FAMILY] [--device cpu|cuda] [--out DIR] [--repeats N] [--skip VARIANT]"""

import argparse
import importlib
import os
import sys
import time

import torch

from . import FAMILIES, harness


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--full", action="store_true", help="all shapes and activations (default: a short run)")
    p.add_argument("--only", choices=FAMILIES, action="append", help="run only this family (repeatable)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="output directory (default: benchmarks/results)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default: 20 cuda, 10 cpu)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: 5 cuda, 2 cpu)")
    p.add_argument("--skip", action="append", default=[], metavar="VARIANT",
                   help="leave out a variant, e.g. --skip compile (repeatable; never the subject)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop a measurement early after this long, with >= 3 samples (default: 5 cuda, 2 cpu)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    repeats = args.repeats or (20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    budget = args.max_seconds or (5.0 if cuda else 2.0)

    def log(msg):
        print(msg, flush=True)  # progress must show while a long run goes on

    torch.manual_seed(0)
    info = harness.machine_info(args.device)
    log(f"device {args.device} ({info['device_name']}), torch {info['torch']}, "
        f"bigkernels {info['bigkernels'].get('version')}, extension loaded: "
        f"{info['bigkernels'].get('extension_loaded')}; repeats {repeats}, warmup {warmup}")
    cases = [c for fam in (args.only or FAMILIES)
             for c in importlib.import_module(f"{__package__}.{fam}").cases(args.device, args.full)]
    t0, records = time.perf_counter(), []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.family}: {case.name}")
        records += harness.run_case(case, args.device, warmup, repeats, budget, log, set(args.skip) - {harness.SUBJECT})
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    table = harness.write_outputs(args.out, info, records)
    log("\n" + table)
    log(f"\n{len(records)} measurements in {info['wall_s']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
