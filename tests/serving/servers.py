"""Real servers for the serving tests: the app under uvicorn on a free loopback port (in a thread),
or `python -m ...` in a child process."""
import os
import socket
import subprocess
import sys
import threading
import time

import httpx


class Server:
    """A uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @property
    def scheduler(self):
        return self.app.state.engine.scheduler

    def wait_healthy(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.02)
        return self

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """`python -m <args>` listening on `port`, its output in a file (no pipe to fill)."""

    def __init__(self, args, port, tmp_path, env=None, health="/health"):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log_path = tmp_path / f"server-{port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.health = health

    def wait_healthy(self, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "the server never became healthy\n" + self.output()
            try:
                if httpx.get(self.url + self.health, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def descendants(self) -> set:
        """Process ids whose parent chain leads to this child (read from /proc)."""
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    parents[int(entry)] = int(fields[1])
                except (OSError, IndexError, ValueError):
                    pass
        found, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        return found

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Gate:
    """Holds the scheduler's worker inside a step until released (patches the masked families'
    batcher): requests pile up behind it in a known state."""

    def __init__(self, monkeypatch):
        from engine.model import MaskedBatcher

        self.entered, self.release = threading.Event(), threading.Event()
        real = MaskedBatcher.step

        def step(batcher, images):
            self.entered.set()
            assert self.release.wait(30)
            return real(batcher, images)
        monkeypatch.setattr(MaskedBatcher, "step", step)
