"""Serving processes for `python -m bench`: end-to-end samples/s of `serve --workers 2` over `serve` (one
serving process), in the same run on the same bands (`workers_scaling`, issue 14, item 5).

Both gateways run side by side from the start, each `serve --insecure` with its defaults (two compute
worker processes per serving process: the one-process gateway has 2, the two-process one 4), SQLite in a
temp dir. The load: 64 simulated bands in 1-minute batches, the per-batch cost of the serving process
being what more serving processes spread (e2e_1min_samples_per_s's load), each band on its own
connection (so the kernel spreads them over the processes), as fast as acks come back, from two
load-generator processes of 32 bands each (`python -m bench.e2e_bench load stream`), so that one load
process is not the ceiling on a bigger machine. Runs alternate 1, 2, 2, 1 (twice in a full run), fresh
device IDs each run; each figure is its runs' samples over their wall time (each run's wall time that of
its slower load process).

Beside the rates, what was busy: the CPU of each gateway's whole process tree (supervisor, serving
processes, compute workers; from /proc) over the runs' wall time, in cores, and per batch; and the load
processes' CPU over the wall time. CPU per batch is the steadier reading on a shared box.
On the 2-core reference box the compute workers alone already keep both cores busy with one serving
process, so a second one has no core to run on: the ratio there is about 1, and says only that the
second process costs nothing. The ≥ 1.6 target is for machines of 4 cores or more.

`python -m bench.workers_bench [--quick]` runs this group alone.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.e2e_bench import FRAME_SAMPLES, Gateway, _children, _fleet_file, _load, _recordings
from bench.tls_bench import _cpu_s

BANDS = 64
LOADERS = 2  # load-generator processes, BANDS / LOADERS bands each


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (supervisor → serving processes → compute workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += _children(p)
    return found


def _children_cpu_s() -> float:
    """CPU of this process's reaped children: the load processes, once a run has waited for them."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(gw: Gateway, files: list[Path]) -> tuple[int, float]:
    """Every file through its own load process at once: (samples acked, wall s of the slowest)."""
    procs = [_load(["stream", "--target", gw.address, "--file", str(f), "--channels", "1"]) for f in files]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"load generator failed ({proc.returncode})")
        results.append(json.loads(out.splitlines()[-1]))
    return sum(r["samples"] for r in results), max(r["wall_s"] for r in results)


def _fleet_files(workdir: Path, recordings: list, run: int) -> tuple[list[Path], int]:
    """The recordings as 1-minute batches under fresh device IDs, one file per load process."""
    per = len(recordings) // LOADERS
    files, samples = [], 0
    for k in range(LOADERS):
        path = workdir / f"workers-{run}-{k}.bgb"
        part = recordings[k * per : (k + 1) * per]
        _, n = _fleet_file(path, part, batch_minutes=1, fleet=1000 + run * LOADERS + k)
        files.append(path)
        samples += n
    return files, samples


def workers_figures(quick: bool, workdir: Path | None = None) -> dict[str, float | int]:
    """workers_scaling, workers_{1,2}_samples_per_s, the cores and CPU per batch of each side, the load
    processes' cores, workers_bench_seconds."""
    started = time.perf_counter()
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="bandgate-workers-") as tmp:
            return workers_figures(quick, Path(tmp))
    minutes, order = (30, (1, 2, 2, 1)) if quick else (180, (1, 2, 2, 1, 1, 2, 2, 1))
    gateways: dict[int, Gateway] = {}
    totals = {n: [0, 0.0, 0.0] for n in (1, 2)}  # samples, wall s, gateway CPU s
    loadgen_cpu = loadgen_wall = 0.0
    try:
        gateways[1] = Gateway(workdir)
        gateways[2] = Gateway(workdir, serve_args=("--workers", "2"))
        # the inputs are made while the gateways start (their own processes, unpinned)
        recordings = _recordings(BANDS, minutes)
        warm_recordings = recordings[:16]
        runs = [(n, *_fleet_files(workdir, recordings, run)) for run, n in enumerate(order)]
        warm = {n: _fleet_files(workdir, warm_recordings, 100 + n)[0] for n in gateways}
        for gw in gateways.values():
            gw.wait_serving()
        # Untimed: every compute worker of both gateways has its kernels loaded before the timed runs.
        for n, gw in gateways.items():
            _run(gw, warm[n])
        for n, files, samples in runs:
            gw = gateways[n]
            pids = _tree(gw.proc.pid)
            cpu, children = _cpu_s(pids), _children_cpu_s()
            acked, wall = _run(gw, files)
            assert acked == samples, (acked, samples)
            totals[n][0] += samples
            totals[n][1] += wall
            totals[n][2] += _cpu_s(pids) - cpu
            loadgen_cpu += _children_cpu_s() - children
            loadgen_wall += wall
    finally:
        for gw in gateways.values():
            gw.stop()
    out: dict[str, float | int] = {"workers_cores": os.cpu_count() or 1}
    for n, (samples, wall, cpu) in totals.items():
        out[f"workers_{n}_samples_per_s"] = samples / wall
        out[f"workers_{n}_gateway_cores"] = cpu / wall
        out[f"workers_{n}_gateway_cpu_ms"] = 1000 * cpu / (samples / FRAME_SAMPLES)  # per 1-minute batch
    out["workers_scaling"] = out["workers_2_samples_per_s"] / out["workers_1_samples_per_s"]
    out["workers_loadgen_cores"] = loadgen_cpu / loadgen_wall
    out["workers_bench_seconds"] = round(time.perf_counter() - started, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(workers_figures("--quick" in sys.argv), indent=2))
