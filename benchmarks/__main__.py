"""python -m benchmarks [--full] [--only FAMILY] [--device cpu|cuda] [--out DIR] [--repeats N] [--skip VARIANT]
[--case TEXT]"""

import argparse
import datetime
import importlib
import os
import sys
import time

import torch

from . import FAMILIES, harness

HERE = os.path.dirname(os.path.abspath(__file__))


def _number(kind, minimum, inclusive):
    """An argparse type: a kind (int/float) >= minimum (> minimum if not inclusive)."""
    def parse(text):
        value = kind(text)
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--full", action="store_true", help="all shapes and activations (default: a short run)")
    p.add_argument("--only", choices=FAMILIES, action="append", help="run only this family (repeatable)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                   help=f"where to run (default here: {default_device}; cuda whenever a GPU is visible)")
    p.add_argument("--out", help="output directory (default: a new folder under benchmarks/runs/, "
                   "which git ignores; benchmarks/results/ holds the published report)")
    p.add_argument("--repeats", type=_number(int, 1, True),
                   help="timed runs per measurement, >= 1 (default: 20 cuda, 10 cpu)")
    p.add_argument("--warmup", type=_number(int, 0, True), help="untimed runs first (default: 5 cuda, 2 cpu)")
    p.add_argument("--skip", action="append", default=[], metavar="VARIANT",
                   help="leave out a baseline variant, e.g. --skip compile (repeatable)")
    p.add_argument("--case", action="append", default=[], metavar="TEXT",
                   help="run only the cases whose name contains TEXT, e.g. --case 8192x256x512 "
                   "(repeatable; names as in the report: 'f32 8192x256x512 gelu')")
    p.add_argument("--max-seconds", type=_number(float, 0, False), default=None,
                   help="stop a measurement early after this long per variant, with >= 3 samples "
                   "(default: 5 cuda, 2 cpu)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    families = [importlib.import_module(f"{__package__}.{fam}") for fam in (args.only or FAMILIES)]
    known = {v for fam in families for v in fam.VARIANTS} - {harness.SUBJECT}
    for name in args.skip:
        if name == harness.SUBJECT:
            p.error(f"--skip {name}: the subject is what every other variant is compared with")
        if name not in known:
            p.error(f"--skip {name}: unknown variant; known: {', '.join(sorted(known))}")
    repeats = args.repeats if args.repeats is not None else (20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    budget = args.max_seconds if args.max_seconds is not None else (5.0 if cuda else 2.0)
    out = args.out or os.path.join(HERE, "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + args.device)

    def log(msg):
        print(msg, flush=True)  # progress must show while a long run goes on

    torch.manual_seed(0)
    info = harness.machine_info(args.device)
    log(f"device {args.device} ({info['device_name']}), torch {info['torch']}, "
        f"bigkernels {info['bigkernels'].get('version')}, extension loaded: "
        f"{info['bigkernels'].get('extension_loaded')}; repeats {repeats}, warmup {warmup}")
    if not cuda:
        log(f"CPU capability: ATen {info['cpu_capability']}, bigkernels {info['bigkernels'].get('cpu_capability')}; "
            f"native bf16: {info['cpu_native_bf16']}")
    cases = [c for fam in families for c in fam.cases(args.device, args.full, log)
             if not args.case or any(text in c.name for text in args.case)]
    if not cases:
        p.error(f"--case {' / '.join(args.case)}: no case of this run matches (try --full)")
    t0, records = time.perf_counter(), []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.family}: {case.name}")
        records += harness.run_case(case, args.device, warmup, repeats, budget, log, set(args.skip) - {harness.SUBJECT})
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    table = harness.write_outputs(out, info, records)
    log("\n" + table)
    log(f"\n{len(records)} measurements in {info['wall_s']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
