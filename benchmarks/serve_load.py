"""Load test of the HTTP service (`engine.serving.http`) on loopback, bounded in requests and time.

    python benchmarks/serve_load.py                       # -> benchmarks/results/serve.json
    python benchmarks/serve_load.py --models digits --out /tmp/serve.json

For each model a server runs in a child process (uvicorn, one torch thread by default, like the
offline runs), and a bounded asyncio + httpx client drives it in closed loop: `concurrency`
workers each send their next request as soon as the previous one is answered, until the run's
request count is reached. Reported per concurrency 1, 4, 16, 32: images/s, p50 / p99 latency.
Next to them, offline `model.sample_tokens` throughput at batch 1, 4, 16, 32 (the same settings,
one generator per image, in this process while the server is idle).

Models:
  * digits: the built-in model with its recorded settings (num_iter 8, cfg 2, 50 diffusion steps).
  * mar_b: MAR-B-shaped random weights (benchmarks/bench_sample.py mar_b: 12+12 blocks of 768,
    head 6 x 1024, 256 tokens of 16 channels), reduced to num_iter 2, 5 diffusion steps, cfg 1
    so that a run stays within minutes on 2 cores. Its tokens are VAE latents; the server decodes
    them with a stand-in decoder (the first three latent channels, tanh, nearest-upsampled to
    256 x 256 RGB), so the KL-16 VAE's cost is in neither number.

Floors (the issue's): digits, 16 concurrent single-image requests at least 2x faster than the
same 16 one after another; mar_b, served images/s at concurrency 16 within 15% of an offline
batch of 16. Overload: a digits server with a small queue gets a burst; every request must be
answered 200 or 429/503 (none lost, no other status) and the server must stay healthy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONCURRENCY = (1, 4, 16, 32)
SETTINGS = {
    "digits": {"steps": None, "request": {}, "requests": {1: 16, 4: 32, 16: 64, 32: 96}},
    "mar_b": {"steps": "5", "request": {"num_iter": 2, "cfg": 1.0},
              "requests": {1: 2, 4: 4, 16: 16, 32: 32}},
}
OFFLINE_REPEATS = {"digits": 3, "mar_b": 1}


# The model and the server (child process) -----------------------------------------------------
def build(name: str):
    """(model, vae or None) of a benchmark model."""
    import torch

    import engine

    if name == "digits":
        return engine.load("digits"), None
    from bench_sample import mar_b

    model = mar_b(SETTINGS[name]["steps"])
    model.set_backend("auto")

    class StandInDecoder(torch.nn.Module):
        """Latents [B, 16, 16, 16] -> [B, 3, 256, 256] in [-1, 1]: not a VAE, only an image."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)

        def decode_tokens(self, tokens):
            x = torch.tanh(tokens[:, :3] * self.scale)
            return x.repeat_interleave(16, dim=-1).repeat_interleave(16, dim=-2)

    return model, StandInDecoder()


def serve_child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from engine.serving.http import create_app, serve

    model, vae = build(args.serve)
    extra = {} if args.reject_delay is None else {"reject_delay": args.reject_delay}
    app = create_app(model=model, vae=vae, max_queue=args.max_queue,
                     max_batch_images=args.max_batch_images, timeout=3600, **extra)
    serve(app, host="127.0.0.1", port=args.port, log_level="warning")


class Child:
    def __init__(self, name, threads, max_queue=256, max_batch_images=32, reject_delay=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", name, "--port", str(self.port), "--threads", str(threads),
             "--max-queue", str(max_queue), "--max-batch-images", str(max_batch_images)]
            + ([] if reject_delay is None else ["--reject-delay", str(reject_delay)]), env=env)

    def wait_healthy(self, timeout=600):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server never became healthy")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# The client ------------------------------------------------------------------------------------
async def closed_loop(url, concurrency, total, body_of, timeout=3600):
    """`concurrency` workers, `total` requests; returns (wall seconds, [(status, latency, images)])."""
    import httpx

    results, counter = [], iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker():
            for i in counter:
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json=body_of(i))
                    status = r.status_code
                    images = len(r.json().get("data", [])) if status == 200 else 0
                except httpx.HTTPError as err:   # counted, never dropped
                    status, images = f"transport error: {type(err).__name__}", 0
                results.append((status, time.perf_counter() - start, images))
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return time.perf_counter() - start, results


def percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(concurrency, wall, results):
    ok = [r for r in results if r[0] == 200]
    latencies = [r[1] for r in ok]
    images = sum(r[2] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok),
            "images": images, "wall_s": round(wall, 3), "images_per_s": round(images / wall, 3),
            "p50_s": round(percentile(latencies, 0.5), 3), "p99_s": round(percentile(latencies, 0.99), 3)}


def scrape(url) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("engine_") and " " in line and "_bucket" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


# Offline ---------------------------------------------------------------------------------------
def offline(name, model, batch_sizes, repeats):
    import torch

    import engine

    settings = engine.sampling_settings(model, **{k: SETTINGS[name]["request"].get(k) for k in
                                                  ("num_iter", "cfg", "cfg_schedule", "temperature")})
    classes = model.config.class_num
    rows = []
    for bsz in batch_sizes:
        times = []
        for r in range(repeats):
            gens = [torch.Generator().manual_seed(1000 * r + i) for i in range(bsz)]
            start = time.perf_counter()
            model.sample_tokens(bsz, labels=[i % classes for i in range(bsz)], generator=gens, **settings)
            times.append(time.perf_counter() - start)
        best = min(times)
        rows.append({"batch": bsz, "seconds": round(best, 3), "images_per_s": round(bsz / best, 3),
                     "repeats": repeats})
        print(f"  offline {name} batch {bsz}: {bsz / best:.2f} images/s", flush=True)
    return rows, settings


def run_model(name, threads):
    import torch

    torch.set_num_threads(threads)
    print(f"{name}: offline sample_tokens", flush=True)
    model, _ = build(name)
    model.sample_tokens(1, num_iter=1, labels=[0], generator=[torch.Generator().manual_seed(0)])   # warm
    offline_rows, settings = offline(name, model, CONCURRENCY, OFFLINE_REPEATS[name])
    del model
    classes = 10 if name == "digits" else 1000
    extra = SETTINGS[name]["request"]
    body_of = lambda i: {"class_label": (7 * i + 3) % classes, "seed": i, **extra}  # noqa: E731
    child = Child(name, threads)
    try:
        child.wait_healthy()
        served = []
        for c in CONCURRENCY:
            total = SETTINGS[name]["requests"][c]
            before = scrape(child.url)
            wall, results = asyncio.run(closed_loop(child.url, c, total, body_of))
            after = scrape(child.url)
            row = summarise(c, wall, results)
            row["statuses"] = sorted({str(r[0]) for r in results})
            step = after.get("engine_step_seconds_sum", 0) - before.get("engine_step_seconds_sum", 0)
            row["step_seconds"] = round(step, 3)   # time inside sampler.advance (model compute)
            served.append(row)
            print(f"  served {name} c={c}: {row['images_per_s']:.2f} images/s, p50 {row['p50_s']} s, "
                  f"p99 {row['p99_s']} s ({row['ok']}/{row['requests']} ok)", flush=True)
        out = {"settings": {**settings, "diffusion_steps": SETTINGS[name]["steps"] or "model's (50)"},
               "offline": offline_rows, "served": served}
        if name == "digits":
            seq, burst = [], []
            for r in range(3):
                wall, res = asyncio.run(closed_loop(child.url, 1, 16, body_of))
                assert all(x[0] == 200 for x in res)
                seq.append(wall)
                wall, res = asyncio.run(closed_loop(child.url, 16, 16, body_of))
                assert all(x[0] == 200 for x in res)
                burst.append(wall)
            out["floor_16_concurrent_vs_sequential"] = {
                "sequential_s": round(statistics.median(seq), 3), "concurrent_s": round(statistics.median(burst), 3),
                "speedup": round(statistics.median(seq) / statistics.median(burst), 2), "required": 2.0,
                "runs": 3}
            print(f"  floor: 16 sequential {statistics.median(seq):.2f} s, 16 concurrent "
                  f"{statistics.median(burst):.2f} s", flush=True)
        else:
            served16 = next(r for r in served if r["concurrency"] == 16)["images_per_s"]
            offline16 = next(r for r in offline_rows if r["batch"] == 16)["images_per_s"]
            out["floor_served_16_vs_offline_16"] = {
                "served_images_per_s": served16, "offline_images_per_s": offline16,
                "ratio": round(served16 / offline16, 3), "required": 0.85}
        return out
    finally:
        child.stop()


def overload(threads, requests=96, max_queue=4, max_batch_images=8):
    import httpx

    print("overload (digits)", flush=True)
    child = Child("digits", threads, max_queue=max_queue, max_batch_images=max_batch_images)
    try:
        child.wait_healthy()
        wall, results = asyncio.run(closed_loop(child.url, requests, requests,
                                                lambda i: {"class_label": i % 10, "seed": i}))
        statuses = {}
        for status, _, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        healthy = httpx.get(child.url + "/health", timeout=30).status_code
        after = httpx.post(child.url + "/v1/images/generations", json={"class_label": 1}, timeout=120).status_code
        metrics = scrape(child.url)
        out = {"requests": requests, "answered": len(results), "statuses": statuses,
               "max_queue": max_queue, "max_batch_images": max_batch_images, "wall_s": round(wall, 3),
               "lost": requests - len(results),
               "only_200_429_503": set(statuses) <= {"200", "429", "503"},
               "health_after": healthy, "request_after": after,
               "rejections_metric": metrics.get('engine_rejections_total{reason="queue_full"}', 0.0)}
        print(f"  {statuses}, health after {healthy}", flush=True)
        return out
    finally:
        child.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "mar_b"], choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (server and offline)")
    parser.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    parser.add_argument("--no-overload", action="store_true")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)   # child mode
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-queue", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-images", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--reject-delay", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_child(args)
    from stamp import machine_stamp

    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    report = {"stamp": machine_stamp(), "threads": args.threads, "client": "asyncio + httpx, loopback, closed loop",
              "models": {}}
    for name in args.models:
        report["models"][name] = run_model(name, args.threads)
    if not args.no_overload:
        report["overload"] = overload(args.threads)
    report["total_s"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_s']} s)")


if __name__ == "__main__":
    main()
