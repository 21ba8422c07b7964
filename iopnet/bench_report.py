"""`iopnet bench`'s outputs: percentiles, the results file, the plot and the table."""

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def latency_summary(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {"n": 0}
    ordered = sorted(samples_ms)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)

    return {"n": len(ordered), "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": round(ordered[-1], 1)}


def write_results(results: dict[str, Any], directory: Path, stamp: str) -> Path:
    """The results without the raw samples (the plot shows their distributions)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps({k: v for k, v in results.items() if k != "samples_ms"}, indent=2) + "\n")
    return path


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per latency: its cumulative distribution, p50/p99 marked."""
    import matplotlib

    matplotlib.use("Agg")  # no screen: render to a file
    import matplotlib.pyplot as plt

    series = {name: values for name, values in results["samples_ms"].items() if values}
    columns = 2
    rows = max(1, (len(series) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(11, 3.2 * rows), squeeze=False)
    for axis, (name, values) in zip(axes.flat, series.items(), strict=False):
        ordered = sorted(values)
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        axis.plot(ordered, fractions)
        summary = results["latency_ms"][name]
        for label in ("p50", "p99"):
            axis.axvline(summary[label], linestyle="--", linewidth=0.8, color="grey")
        axis.set_title(f"{name} (n={summary['n']}, p50 {summary['p50']}, p99 {summary['p99']})", fontsize=8)
        axis.set_xlabel("ms")
        axis.set_ylim(0, 1)
    for axis in list(axes.flat)[len(series) :]:
        axis.axis("off")
    database = results["config"]["database"]
    figure.suptitle(f"iopnet bench ({database}): {results['config']['patients']} patients", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_table(results: dict[str, Any]) -> None:
    console = Console()
    waves = Table(title="HTTP waves at intake")
    for column in ("wave", "requests", "seconds", "per second"):
        waves.add_column(column)
    for name, wave in results["waves"].items():
        waves.add_row(name, str(wave["requests"]), str(wave["seconds"]), str(wave["per_s"]))
    console.print(waves)
    latency = Table(title="Latency (ms)")
    for column in ("what", "n", "p50", "p95", "p99", "max"):
        latency.add_column(column)
    for name, summary in results["latency_ms"].items():
        latency.add_row(name, *(str(summary.get(k, "-")) for k in ("n", "p50", "p95", "p99", "max")))
    console.print(latency)
    raw = results["raw_baseline"]
    consumers = Table(title=f"Consumers (raw nats-py pull consumer: {raw['consume_per_s']}/s)")
    for column in ("service", "applied", "peak/s", "mean/s backlogged", "mean / raw"):
        consumers.add_column(column)
    for name, rates in results["consumers"].items():
        figures = (rates["peak_per_s"], rates["mean_per_s_while_backlogged"], rates["ratio_mean_to_raw_consume"])
        consumers.add_row(name, str(int(rates["applied"])), *(str(f) for f in figures))
    console.print(consumers)
    cost = results["request_cost"]
    names = list(cost["check_in"]["cpu_ms_per_request"])
    per_request = Table(title="CPU ms per request, each process (quiet network, flat out)")
    for column in ("request", "per second", *names):
        per_request.add_column(column)
    for kind, figures in cost.items():
        spent = figures["cpu_ms_per_request"]
        per_request.add_row(kind, str(figures["per_s"]), *(str(spent.get(name, "-")) for name in names))
    console.print(per_request)
    processes = Table(title="Processes")
    for column in ("process", "peak RSS MB", "CPU s", "nice"):
        processes.add_column(column)
    for name, stats in results["processes"].items():
        niceness = str(stats.get("niceness", "-"))  # results of before it was recorded have none
        rss = "-" if stats["peak_rss_mb"] is None else f"{stats['peak_rss_mb']:.0f}"
        processes.add_row(name, rss, f"{stats['cpu_seconds']:.1f}", niceness)
    console.print(processes)
