"""Time from `rom-agent serve` to the first 200 on /health, on the embedded default.

Usage: .venv/bin/python bench/startup_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_start() -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "warning"}
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "rom_agent", "serve"],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = started + 30
            while time.perf_counter() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                        return time.perf_counter() - started
                except OSError:
                    time.sleep(0.01)
            raise RuntimeError("the service did not answer /health within 30 s")
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    runs = [one_start() for _ in range(parser.parse_args().runs)]
    print(
        f"serve -> first 200 on /health: median {statistics.median(runs):.2f} s "
        f"(min {min(runs):.2f}, max {max(runs):.2f}, {len(runs)} runs)"
    )


if __name__ == "__main__":
    main()
