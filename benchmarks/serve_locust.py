"""Load benchmark of `engine serve` with locust (loopback only, bounded in time): images/s and
p50 / p95 / p99 latency at 1, 4, 16, 64 users for the built-in digits model and a MAR-B-shaped
random model, and a retry flood.

    pip install -e ".[serve,bench]"
    python benchmarks/serve_locust.py                    # -> benchmarks/results/serve_locust.json
    python benchmarks/serve_locust.py --seconds 5 --models digits --out /tmp/locust.json

Each server is a child process (benchmarks/serve_load.py's: uvicorn, one torch thread, the
digits model at its recorded settings, MAR-B-shaped random weights reduced to num_iter 1 and 5
diffusion steps with a stand-in decoder). Each load run is a headless locust run in its own child
process (locust patches the standard library with gevent): `users` closed-loop users with no
wait time, each POSTing single-image requests, for a fixed time (digits), or one request each
(MAR-B: a request takes seconds, so a fixed window would cut requests off). Reported: images/s
(images of 200 answers / wall time), p50 / p95 / p99 of the 200 answers' latency, and the
other statuses.

Retry flood (the issue's): a digits server with --max-queue 4 and --max-batch-images 8, 16 users
that retry at once on 429, against the same 16 users on a server whose queue never fills
(--max-queue 256): the flood must keep at least 70% of the flood-free images/s. A third run
turns the refusals' pacing off (--reject-delay 0) to show what it buys.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

USERS = (1, 4, 16, 64)
BODIES = {"digits": {}, "mar_b": {"num_iter": 1, "cfg": 1.0}}
FLOOR = 0.70


def locust_child(url: str, users: int, seconds: float, body: dict, once: bool = False) -> dict:
    """One headless locust run (in this process; locust monkey-patches it with gevent): for
    `seconds`, or with `once` until every user has one answer (at most `seconds`)."""
    import gevent
    from locust import FastHttpUser, constant, task
    from locust.exception import StopUser
    from locust.env import Environment

    latencies = []       # of the 200 answers
    answered = []

    class Client(FastHttpUser):
        host = url
        wait_time = constant(0)
        network_timeout = connection_timeout = 600.0

        @task
        def generate(self):
            start = time.perf_counter()
            with self.client.post("/v1/images/generations", json={"class_label": 3, **body},
                                  catch_response=True, name=str(users)) as r:
                if r.status_code == 200:
                    r.success()
                    latencies.append(time.perf_counter() - start)
                else:
                    r.failure(str(r.status_code))     # a 429 is retried at once: the next task
            if once:
                answered.append(1)
                raise StopUser()

    env = Environment(user_classes=[Client])
    runner = env.create_local_runner()
    start = time.perf_counter()
    runner.start(users, spawn_rate=users)
    gevent.spawn_later(seconds, runner.quit)
    if once:
        def all_answered():
            while len(answered) < users:
                gevent.sleep(0.05)
            times.append(time.perf_counter())
            runner.quit()
        times = []
        gevent.spawn(all_answered)
    runner.greenlet.join()
    wall = (times[0] if once and times else time.perf_counter()) - start
    errors = {}
    for entry in env.stats.errors.values():
        errors[str(entry.error)] = errors.get(str(entry.error), 0) + entry.occurrences
    ok = len(latencies)
    return {"users": users, "seconds": round(wall, 2), "ok": ok, "images_per_s": round(ok / wall, 3),
            **{f"p{q}_s": percentile(latencies, q / 100) for q in (50, 95, 99)}, "other_statuses": errors}


def percentile(values, q):
    """Nearest-rank percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))], 3)


def run_locust(url, users, seconds, body, once=False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--locust", url, "--users", str(users), "--seconds", str(seconds),
                          "--body", json.dumps(body)] + (["--once"] if once else []),
                         capture_output=True, text=True, timeout=seconds + 900)
    if out.returncode != 0:
        raise RuntimeError(f"locust failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


FLOOD_CONFIGS = (("flood_free", 256, None), ("retry_flood", 4, None), ("retry_flood_without_reject_delay", 4, 0.0))


def retry_flood(args) -> dict:
    """The three digits servers (max-batch-images 8) run side by side, idle but for the run at
    hand; `--repeats` rounds of one 16-user run each, interleaved, so that the load of a shared
    machine falls on all three alike. The ratio is the median over rounds of flood / flood-free."""
    import statistics

    import httpx
    from serve_load import Child

    children = {label: Child("digits", args.threads, max_queue=q, max_batch_images=8, reject_delay=d)
                for label, q, d in FLOOD_CONFIGS}
    rounds = []
    try:
        for child in children.values():
            child.wait_healthy()
        for r in range(args.repeats):
            row = {}
            for label, max_queue, _ in FLOOD_CONFIGS:
                url = children[label].url
                before = rejections(httpx.get(url + "/metrics").text)
                row[label] = run_locust(url, 16, args.seconds, BODIES["digits"])
                row[label]["rejections"] = rejections(httpx.get(url + "/metrics").text) - before
                print(f"round {r}: {label} (max-queue {max_queue}, max-batch-images 8, 16 users): {row[label]}",
                      flush=True)
            row["ratio"] = round(row["retry_flood"]["images_per_s"] / max(row["flood_free"]["images_per_s"], 1e-9), 3)
            row["ratio_without_reject_delay"] = round(row["retry_flood_without_reject_delay"]["images_per_s"]
                                                      / max(row["flood_free"]["images_per_s"], 1e-9), 3)
            rounds.append(row)
    finally:
        for child in children.values():
            child.stop()
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"retry flood keeps {ratio:.0%} of the flood-free images/s (median of {len(rounds)}; floor {FLOOR:.0%})",
          flush=True)
    return {"rounds": rounds, "ratio": ratio,
            "ratio_without_reject_delay": statistics.median(r["ratio_without_reject_delay"] for r in rounds),
            "floor": FLOOR, "holds": ratio >= FLOOR}


def rejections(metrics: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('engine_rejections_total{reason="queue_full"}'))


def p_fmt(row, key):
    return "-" if row[key] is None else f"{row[key]:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "mar_b"], choices=list(BODIES))
    parser.add_argument("--seconds", type=float, default=10.0, help="per digits run (MAR-B: 2x)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--out", default=str(HERE / "results" / "serve_locust.json"))
    parser.add_argument("--no-flood", action="store_true")
    parser.add_argument("--flood-only", action="store_true", help="only the retry flood (keeps the other rows)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the retry flood")
    parser.add_argument("--locust", default=None, help=argparse.SUPPRESS)      # child mode
    parser.add_argument("--users", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--body", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.locust:
        print(json.dumps(locust_child(args.locust, args.users, args.seconds, json.loads(args.body), args.once)))
        return 0

    from serve_load import Child
    from stamp import machine_stamp

    result = {"stamp": machine_stamp(), "users": list(USERS), "models": {}}
    if args.flood_only and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        result["models"], result["models_stamp"] = earlier["models"], earlier.get("models_stamp", earlier["stamp"])
    for name in [] if args.flood_only else args.models:
        once = name == "mar_b"     # a MAR-B request takes seconds: each user sends one
        seconds = 600 if once else args.seconds
        child = Child(name, args.threads, max_queue=256, max_batch_images=64)
        try:
            child.wait_healthy()
            rows = []
            for users in USERS:
                row = run_locust(child.url, users, seconds, BODIES[name], once)
                rows.append(row)
                print(f"{name} users={users}: {row['images_per_s']} images/s, p50 {p_fmt(row, 'p50_s')} s, "
                      f"p95 {p_fmt(row, 'p95_s')} s, p99 {p_fmt(row, 'p99_s')} s, {row['other_statuses']}",
                      flush=True)
            result["models"][name] = rows
        finally:
            child.stop()
    if not args.no_flood:
        result["retry_flood"] = retry_flood(args)
    elif Path(args.out).exists():     # keep the flood rows of an earlier run
        result["retry_flood"] = json.loads(Path(args.out).read_text()).get("retry_flood")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
