"""Cross-framework benchmark: stablemath against each backend's own functions.

    python benchmarks/run.py                  # quick set: 66 s on 2 CPU cores, 106 s when
                                              # the kernels compile (a fresh install)
    python benchmarks/run.py --full           # the real measurements
    python benchmarks/run.py --ops softmax,ce_fwd --providers sm-torch,torch
    python benchmarks/run.py --shapes 2x10 --dtypes float32 --budget 0.05   # smoke run
    python benchmarks/run.py --device cuda    # torch / JAX / CuPy on the GPU

For each case (op, shape, dtype) every provider gets the same data, the copy baselines
of its backend are measured beside it, and all are timed interleaved (see timing.py).
Prints the markdown tables, writes ``results.json`` (+ ``history.jsonl``), ``results.md``
and PNG plots under ``--out``. No figure is ever asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from providers import (
    BACKENDS,
    DTYPES,
    OPS,
    PROVIDERS,
    REGISTRY,
    Case,
    available,
    copy_backend,
    peak_memory,
    setup_copy,
)
from report import machine_info, markdown_report, plot, write_json
from timing import Timing, measure

HERE = Path(__file__).parent

# (shape, dtypes); half precision only where a backend has it on CPU (torch, JAX)
QUICK = [
    ((1, 10), ("float32",)),
    ((4096, 1000), DTYPES),
    ((256, 32000), ("float32",)),
]
FULL = [
    (shape, DTYPES)
    for shape in [
        (1, 10),
        (1024, 1024),
        (4096, 1000),
        (8, 128256),
        (256, 32000),
        (4096, 32000),
        (65536, 1024),
    ]
]
# per case: seconds of interleaved rounds, and the fewest / most rounds
EFFORT = {"quick": (0.6, 3, 100), "full": (5.0, 7, 1000)}


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick set (default)")
    size.add_argument("--full", action="store_true", help="all shapes and dtypes, longer")
    parser.add_argument("--ops", type=_csv, default=list(OPS), help=f"of {','.join(OPS)}")
    parser.add_argument(
        "--providers", type=_csv, default=list(PROVIDERS), help=f"of {','.join(PROVIDERS)}"
    )
    parser.add_argument(
        "--shapes",
        type=lambda s: [_shape(x) for x in _csv(s)],
        default=None,
        help="e.g. 1x10,4096x1000 instead of the set",
    )
    parser.add_argument(
        "--dtypes", type=_csv, default=None, help=f"of {','.join(DTYPES)} (default: the set's)"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timed rounds per case"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)
    for name, given, known in (("op", args.ops, OPS), ("provider", args.providers, PROVIDERS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {list(known)}")
    if args.dtypes and not set(args.dtypes) <= set(DTYPES):
        parser.error(f"dtypes must be among {DTYPES}, got {args.dtypes}")
    return args


def select_providers(names: list[str], device: str) -> list[str]:
    """The requested providers whose libraries are installed and that run on ``device``."""
    kept = []
    for name in names:
        provider = PROVIDERS[name]
        missing = provider.missing()
        if missing:
            _note(f"note: skipping {name}: {', '.join(missing)} not installed")
        elif device.split(":")[0] not in BACKENDS[provider.backend].devices:
            _note(f"note: skipping {name}: no {device} support")
        else:
            kept.append(name)
    return kept


def build_cases(args: argparse.Namespace) -> list[Case]:
    if args.shapes:
        plan = [(shape, tuple(args.dtypes or ["float32"])) for shape in args.shapes]
    else:
        plan = FULL if args.full else QUICK
        if args.dtypes:
            plan = [
                (shape, tuple(d for d in dtypes if d in args.dtypes)) for shape, dtypes in plan
            ]
    return [
        Case(op, shape, dtype, args.device)
        for op in args.ops
        for shape, dtypes in plan
        for dtype in dtypes
    ]


def _prepare(name: str, case: Case) -> Callable[[], Any] | str:
    """Set up a provider and call it once (compiles under jit): the callable or an error."""
    try:
        fn = REGISTRY[case.op][name](case)
        fn()
    except Exception as exc:  # a provider that cannot run a case is reported, not fatal
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return fn


def run_case(case: Case, names: list[str], effort: tuple[float, int, int]) -> dict[str, Any]:
    """Time every provider of a case and its copy baselines, side by side."""
    fns: dict[str, Callable[[], Any]] = {}
    errors = {}
    for name in names:
        prepared = _prepare(name, case)
        if isinstance(prepared, str):
            errors[name] = prepared
        else:
            fns[name] = prepared
    # One group per library, timed on its own: within a group the providers are
    # interleaved, but a NumPy call is never timed right after a torch one. torch's
    # OpenMP workers keep spinning on the cores for milliseconds after each torch op,
    # which a NumPy user's process does not have (stablemath's threaded NumPy softmax,
    # 4096x1000: 6.5 ms right after torch.softmax, 3.7 ms with OMP_WAIT_POLICY=PASSIVE);
    # stablemath on torch tensors is still timed beside torch, as torch users run it.
    groups: dict[str, dict[str, Callable[[], Any]]] = {}
    for name, fn in fns.items():
        groups.setdefault(copy_backend(name), {})[name] = fn
    for backend, group in groups.items():
        group[f"copy-{backend}"] = setup_copy(backend, case)
    fns = {name: fn for group in groups.values() for name, fn in group.items()}
    budget, min_rounds, max_rounds = effort
    timings: dict[str, Timing] = {}
    for group in groups.values():  # the case's budget shared by the number of callables
        share = budget * len(group) / len(fns)
        timings.update(
            measure(group, budget_s=share, min_rounds=min_rounds, max_rounds=max_rounds)
        )
    peaks = {name: peak_memory(name, fns[name], case.device) for name in names if name in fns}
    return {"timings": timings, "errors": errors, "peaks": peaks}


def _timing_fields(t: Timing) -> dict[str, Any]:
    return {
        "p20": t.p20,
        "p50": t.p50,
        "p80": t.p80,
        "rounds": len(t.samples),
        "calls_per_sample": t.inner,
        "samples": list(t.samples),
    }


def case_records(case: Case, measured: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """JSON records for a case: one per provider, one per copy baseline."""
    timings: dict[str, Timing] = measured["timings"]
    base = {
        "op": case.op,
        "shape": list(case.shape),
        "shape_label": case.label,
        "dtype": case.dtype,
        "device": case.device,
    }
    copies = []
    copy_gbps = {}
    for name, t in timings.items():
        if name.startswith("copy-"):
            copy_gbps[name] = case.copy_bytes() / t.p50 / 1e9
            copies.append(
                {**base, "baseline": name, "bytes": case.copy_bytes(), "gbps": copy_gbps[name]}
                | _timing_fields(t)
            )
    results = []
    for name, t in timings.items():
        if name.startswith("copy-"):
            continue
        native = PROVIDERS[name].native
        native_t = timings.get(native) if native else None
        gbps = case.bytes_moved() / t.p50 / 1e9
        reference = copy_gbps.get(f"copy-{copy_backend(name)}")
        results.append(
            {
                **base,
                "provider": name,
                "backend": PROVIDERS[name].backend,
                "bytes": case.bytes_moved(),
                "gbps": gbps,
                "copy_gbps": reference,
                "pct_of_copy": 100 * gbps / reference if reference else None,
                "native": native,
                "ratio_to_native": t.p50 / native_t.p50 if native_t else None,
                "peak_mem_bytes": measured["peaks"].get(name),
            }
            | _timing_fields(t)
        )
    return results, copies


def _progress(cases: list[Case]) -> Iterator[Case]:
    """Iterate with a progress bar (tqdm, or a plain line per case without it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, case in enumerate(cases, 1):
            _note(f"[{i}/{len(cases)}] {case.op} {case.label} {case.dtype}")
            yield case
        return
    bar = tqdm(cases, unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.op} {case.label} {case.dtype}")
        yield case


def _note(message: str) -> None:
    """A line on stderr that does not break a running progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=sys.stderr)
    else:
        tqdm.write(message, file=sys.stderr)


def _plot(results: list[dict], out: Path, title: str) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _note("note: matplotlib not installed, no plots")
        return []
    return [p.name for p in plot(results, out, title)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: torch sees no CUDA device", file=sys.stderr)
            return 2
    names = select_providers(args.providers, args.device)
    cases = [c for c in build_cases(args) if any(available(PROVIDERS[n], c) for n in names)]
    mode = "full" if args.full else "quick"
    budget, min_rounds, max_rounds = EFFORT[mode]
    effort = (args.budget if args.budget is not None else budget, min_rounds, max_rounds)

    start = time.perf_counter()
    results: list[dict] = []
    copies: list[dict] = []
    errors: list[dict] = []
    for case in _progress(cases):
        case_names = [n for n in names if available(PROVIDERS[n], case)]
        measured = run_case(case, case_names, effort)
        for name, message in measured["errors"].items():
            _note(f"note: {name} failed on {case.op} {case.label} {case.dtype}: {message}")
            errors.append(
                {
                    "op": case.op,
                    "shape_label": case.label,
                    "dtype": case.dtype,
                    "provider": name,
                    "error": message,
                }
            )
        case_results, case_copies = case_records(case, measured)
        results += case_results
        copies += case_copies
    elapsed = time.perf_counter() - start

    report = markdown_report(results)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device)
    payload = {
        "machine": machine,
        "settings": {
            "mode": "custom" if args.shapes else mode,
            "budget_s_per_case": effort[0],
            "min_rounds": effort[1],
            "max_rounds": effort[2],
            "ops": args.ops,
            "providers": names,
            "wall_s": elapsed,
        },
        "results": results,
        "copy_baselines": copies,
        "errors": errors,
    }
    write_json(args.out / "results.json", payload)
    (args.out / "results.md").write_text(
        f"Run {machine['date']} on {machine['cpu']} ({machine['cpus_usable']} CPUs usable), "
        f"device {args.device}.\n\n{report}"
    )
    written = ["results.json", "history.jsonl", "results.md"]
    if not args.no_plots:
        title = f"{machine['cpu']}, {args.device}"
        written += _plot(results, args.out, title)
    print(f"{len(results)} figures in {elapsed:.0f} s; wrote {', '.join(written)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
