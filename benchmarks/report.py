"""What a run leaves behind: the markdown tables, the JSON of every figure, the plots."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LIBRARIES = ("stablemath", "numpy", "scipy", "torch", "jax", "jaxlib", "optax", "dask", "cupy")
SM_PROVIDERS = ("sm-numpy", "sm-torch", "sm-jax", "sm-cupy")
_DTYPE_ORDER = {"float32": 0, "bfloat16": 1, "float16": 2}


# --- formatting -------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: list[dict[str, Any]]) -> str:
    """One row per (op, shape, dtype, provider)."""
    header = [
        "op",
        "shape",
        "dtype",
        "provider",
        "p50",
        "p20 / p80",
        "GB/s",
        "% of copy",
        "vs native",
        "peak mem",
    ]
    rows = [
        [
            r["op"],
            r["shape_label"],
            r["dtype"],
            r["provider"],
            fmt_time(r["p50"]),
            f"{fmt_time(r['p20'])} / {fmt_time(r['p80'])}",
            f"{r['gbps']:.3g}",
            _num(r["pct_of_copy"], ".3g", "%"),
            _num(r["ratio_to_native"], ".2f", f"x {r['native']}"),
            _num(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**20, ".4g", " MiB"),
        ]
        for r in results
    ]
    return _markdown(header, rows)


def ratio_table(results: list[dict[str, Any]]) -> str:
    """stablemath's median time over the native's, one column per backend."""
    present = [p for p in SM_PROVIDERS if any(r["provider"] == p for r in results)]
    header = ["op", "shape", "dtype"] + [f"{p} / {_native_of(results, p)}" for p in present]
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in results:
        row = cells.setdefault((r["op"], r["shape_label"], r["dtype"]), {})
        if r["provider"] in present and r["ratio_to_native"] is not None:
            row[r["provider"]] = f"{r['ratio_to_native']:.2f}"
    rows = [[*key, *(row.get(p, "—") for p in present)] for key, row in cells.items()]
    return _markdown(header, rows)


def _native_of(results: list[dict[str, Any]], provider: str) -> str:
    return next((r["native"] for r in results if r["provider"] == provider), "?")


def overhead_table(results: list[dict[str, Any]], shape_label: str = "1x10") -> str | None:
    """Call overhead: the tiny case, stablemath minus the native call, in microseconds."""
    p50 = {(r["op"], r["shape_label"], r["dtype"], r["provider"]): r["p50"] for r in results}
    rows = []
    for r in results:
        if r["shape_label"] != shape_label or r["provider"] not in SM_PROVIDERS:
            continue
        native = p50.get((r["op"], shape_label, r["dtype"], r["native"]))
        if native is None:
            continue
        rows.append(
            [
                r["op"],
                r["dtype"],
                f"{r['provider']} vs {r['native']}",
                f"{r['p50'] * 1e6:.1f}",
                f"{native * 1e6:.1f}",
                f"{(r['p50'] - native) * 1e6:+.1f}",
            ]
        )
    if not rows:
        return None
    header = ["op", "dtype", "providers", "stablemath µs", "native µs", "overhead µs"]
    return _markdown(header, rows)


def markdown_report(results: list[dict[str, Any]]) -> str:
    parts = ["## Results", results_table(results)]
    parts += ["## Ratio to the native (p50 time; < 1 is faster)", ratio_table(results)]
    overhead = overhead_table(results)
    if overhead:
        parts += ["## Call overhead (1x10, p50)", overhead]
    return "\n\n".join(parts) + "\n"


# --- machine and JSON -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def machine_info(device: str) -> dict[str, Any]:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "versions": versions,
        "git_commit": _git_commit(),
        "device": device,
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")
    # one line per run, appended: the history the docs can plot
    with (path.parent / "history.jsonl").open("a") as f:
        f.write(json.dumps(payload) + "\n")


# --- plots --------------------------------------------------------------------------------


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def plot(results: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """``time_<op>.png`` per op and ``ratio_to_native.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per provider in every figure of the run
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {
        p: cycle[i % len(cycle)] for i, p in enumerate(_ordered(r["provider"] for r in results))
    }
    written = []
    for op in _ordered(r["op"] for r in results):
        rows = [r for r in results if r["op"] == op]
        path = out / f"time_{op}.png"
        written.append(_plot_times(plt, rows, path, f"{op} — {title}", colors))
    ratios = [r for r in results if r["provider"] in SM_PROVIDERS and r["ratio_to_native"]]
    if ratios:
        written.append(_plot_ratios(plt, ratios, out / "ratio_to_native.png", title))
    return written


def _shape_ticks(rows: list[dict[str, Any]]) -> list[str]:
    """Shapes present, smallest first."""
    sizes = {r["shape_label"]: r["shape"][0] * r["shape"][1] for r in rows}
    return sorted(sizes, key=sizes.__getitem__)


def _plot_times(
    plt: Any, rows: list[dict[str, Any]], path: Path, title: str, colors: dict[str, str]
) -> Path:
    dtypes = _ordered(r["dtype"] for r in rows)
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(5.5 * len(dtypes) + 1, 4.5), squeeze=False, sharey=True
    )
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        sub = [r for r in rows if r["dtype"] == dtype]
        ticks = _shape_ticks(sub)
        for provider in _ordered(r["provider"] for r in sub):
            pts = sorted(
                (ticks.index(r["shape_label"]), r) for r in sub if r["provider"] == provider
            )
            xs = [i for i, _ in pts]
            p50 = [r["p50"] for _, r in pts]
            err = [[r["p50"] - r["p20"] for _, r in pts], [r["p80"] - r["p50"] for _, r in pts]]
            style = "-" if provider.startswith("sm-") else "--"
            ax.errorbar(
                xs,
                p50,
                yerr=err,
                fmt=style + "o",
                ms=4,
                capsize=3,
                color=colors[provider],
                label=provider,
            )
        ax.set_xticks(range(len(ticks)), ticks, rotation=30)
        ax.set_yscale("log")
        ax.set_title(dtype)
        ax.set_xlabel("shape (rows x classes), by size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time per call (p50, bars p20-p80) [s]")
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_ratios(plt: Any, rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    providers = _ordered(r["provider"] for r in rows)
    fig, axes = plt.subplots(
        1, len(providers), figsize=(5 * len(providers) + 1, 4.5), squeeze=False
    )
    for ax, provider in zip(axes[0], providers, strict=True):
        sub = [r for r in rows if r["provider"] == provider]
        cases = sorted(
            _ordered((r["shape_label"], r["dtype"]) for r in sub),
            key=lambda c: (_shape_ticks(sub).index(c[0]), _DTYPE_ORDER.get(c[1], 9)),
        )
        for op in _ordered(r["op"] for r in sub):
            pts = sorted(
                (cases.index((r["shape_label"], r["dtype"])), r["ratio_to_native"])
                for r in sub
                if r["op"] == op
            )
            ax.plot([i for i, _ in pts], [v for _, v in pts], "o-", ms=4, label=op)
        ax.axhline(1.0, color="black", lw=1, ls=":")
        ax.set_xticks(range(len(cases)), [f"{s}\n{d}" for s, d in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{provider} / {sub[0]['native']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time ratio to the native (p50; < 1 is faster)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"stablemath vs each backend's own function — {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
