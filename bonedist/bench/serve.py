"""``bonedist bench serve BUNDLE``: the HTTP service's radiographs/s and latency (p50, p95, p99) at several
concurrency levels over real HTTP on localhost, beside ``bonedist predict`` one call per image and the worklist path
(``predict --table``), and the bundle's onnxruntime batch throughput beside torch eager on the same batch, all in
one run on the same radiographs.

The service is started as a user starts it (``bonedist serve BUNDLE`` in its own process); every client thread keeps
one connection and sends multipart uploads with a sex, cycling through the images. A request counts as served only
when it answers 200 with a bone age; anything else is counted and reported.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from bonedist import BonedistError
from bonedist.bench.predict import _command, _images, _run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and ``file`` parts; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def start_service(bundle: str | Path, port: int, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """``bonedist serve BUNDLE`` on localhost:``port``, returned once ``/ready`` answers 200."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen([sys.executable, "-m", "bonedist", "serve", str(bundle), "--port", str(port),
                             "--log-level", "warning", *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BonedistError(f"bonedist serve {bundle} exited with {proc.returncode} before it was ready"
                                + (f" (see {log})" if log else ""))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise BonedistError(f"bonedist serve {bundle} was not ready within 180 s")


def load(port: int, bodies: list[tuple[bytes, str]], requests: int, clients: int,
         path: str = "/v1/predictions", headers: dict | None = None) -> dict:
    """``requests`` POSTs from ``clients`` threads (one kept-alive connection each): rate, latency percentiles and
    the statuses seen."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(requests))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, kind = bodies[i % len(bodies)]
            start = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": kind, **(headers or {})})
                response = conn.getresponse()
                payload = response.read()
                status = response.status
                if status == 200 and "bone_age_months" not in json.loads(payload):
                    status = -1
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "seconds": elapsed, "per_s": statuses.get(200, 0) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "statuses": statuses}


def _throughput(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_serve(o) -> dict:
    from bonedist.serving.bundle import Bundle, prepare

    bundle = Bundle(o.bundle)
    runs = o.runs or bundle.description.get("source_runs")
    if not runs or not Path(runs).is_dir():
        raise BonedistError(f"--runs {runs}: not a folder; give the runs folder the bundle was exported from")
    try:
        levels = [int(c) for c in str(o.clients).split(",") if c.strip()]
    except ValueError:
        raise BonedistError(f"--clients {o.clients!r}: expected comma-separated numbers such as 1,8,32") from None
    if not levels or min(levels) < 1:
        raise BonedistError(f"--clients {o.clients!r}: each level must be at least 1")
    results: dict = {"bundle": str(o.bundle), "runs": str(runs), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bonedist-bench-serve-") as tmp:
        scratch = Path(tmp)
        files = _images(Path(o.images) if o.images else None, scratch)
        bodies = [multipart({"sex": "MF"[i % 2]}, [(f.name, f.read_bytes())]) for i, f in enumerate(files)]
        print(f"bench serve: {o.bundle} ({', '.join(bundle.names)}), {len(files)} radiographs, {os.cpu_count()} "
              f"CPU(s); clients {levels}, {o.requests} requests each")
        port = free_port()
        service = start_service(o.bundle, port, log=scratch / "serve.log")
        try:
            load(port, bodies, 2 * max(levels), max(levels))  # warm-up, not counted
            results["service"] = [load(port, bodies, o.requests, c) for c in levels]
        finally:
            service.terminate()
            service.wait(30)
        single_s = [_run(_command(str(files[i % len(files)]), "--sex", "MF"[i % 2], "--runs", str(runs)))
                    for i in range(o.single)]
        results["predict_single_per_s"] = o.single / sum(single_s)
        table = scratch / "worklist.csv"
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "sex"])
            for i in range(o.requests):
                writer.writerow([str(files[i % len(files)].resolve()), "MF"[i % 2]])
        worklist_s = _run(_command("--table", str(table), "--allow-outside-image-dir", "--runs", str(runs),
                                   "--out", str(scratch / "out.csv")))
        results["predict_worklist_per_s"] = o.requests / worklist_s
        batch = np.stack([prepare(files[i % len(files)].read_bytes(), files[i % len(files)].name, bundle.pack)[0]
                          for i in range(o.batch_size)])
        male = np.arange(o.batch_size) % 2 == 0
        results["onnxruntime_per_s"] = o.batch_size / _throughput(lambda: bundle.predict(batch, male))
        results["torch_per_s"] = o.batch_size / _torch_batch(runs, batch, male)
    _print(results)
    return results


def _torch_batch(runs, batch: np.ndarray, male: np.ndarray) -> float:
    import torch

    from bonedist.eval.predict import Ensemble

    ensemble = Ensemble(runs)
    images, sexes = torch.from_numpy(batch)[:, None], torch.from_numpy(male)
    return _throughput(lambda: ensemble.predict(images, sexes))


def _print(r: dict) -> None:
    base = r["predict_single_per_s"]
    print("\n| path | radiographs/s | p50 ms | p95 ms | p99 ms | non-200 | × one predict call per image |")
    print("|---|---|---|---|---|---|---|")
    for row in r["service"]:
        bad = sum(v for k, v in row["statuses"].items() if k != 200)
        print(f"| HTTP service, {row['clients']} client(s) | {row['per_s']:.1f} | {row['p50_ms']:.0f} | "
              f"{row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {bad} | {row['per_s'] / base:.1f}x |")
    print(f"| bonedist predict --table (worklist) | {r['predict_worklist_per_s']:.1f} | | | | | "
          f"{r['predict_worklist_per_s'] / base:.1f}x |")
    print(f"| bonedist predict IMAGE, one call per image (baseline) | {base:.2f} | | | | | 1.0x |")
    print(f"\nbundle on onnxruntime: {r['onnxruntime_per_s']:.1f} radiographs/s, torch eager (bonedist predict's "
          f"ensemble): {r['torch_per_s']:.1f}/s on the same batch: {r['onnxruntime_per_s'] / r['torch_per_s']:.2f}x")
    at8 = next((row for row in r["service"] if row["clients"] == 8), None)
    if at8:
        print(f"service at 8 clients: p99 {at8['p99_ms']:.0f} ms, {at8['per_s'] / base:.1f}x the radiographs/s of "
              f"one bonedist predict call per image")
