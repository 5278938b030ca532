"""vLLM's OpenAI-compatible server for one local folder, started and stopped by our own tools.

`heapr-serve bench` (folders as arms), the quality table and the tests all need the same thing: vLLM
on a free loopback port, in its own process group so the API server and its engine core stop
together, ready once `/health` answers, and a one-line error with the log's tail if it dies while
loading. Pruned folders are served through the heapr-serve plugin, which vLLM loads from its entry
point; dense ones by stock vLLM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from heapr_serve.errors import HeaprError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalVllmServer:
    """`python -m vllm.entrypoints.openai.api_server --model FOLDER` on 127.0.0.1 (the `vllm`
    console script is broken in the CPU build), or with `through_serve` the same server behind
    `heapr-serve serve FOLDER` (its checks first). Use `start()`/`wait_ready()`/`stop()` to start
    several at once, or `with LocalVllmServer(...) as server:`."""

    def __init__(self, folder: str | Path, *, served_name: str | None = None, extra: list[str] | tuple = (),
                 log: Path | None = None, env: dict[str, str] | None = None, startup_timeout: float = 600.0,
                 port: int | None = None, through_serve: bool = False) -> None:
        self.folder, self.served_name, self.extra = Path(folder), served_name, list(extra)
        self.through_serve = through_serve
        self.log, self.env, self.startup_timeout = (Path(log) if log else None), dict(env or {}), startup_timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.through_serve:
            cmd = [sys.executable, "-m", "heapr_serve.cli", "serve", str(self.folder)]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.served_name:
            cmd += ["--served-model-name", self.served_name]
        return cmd + self.extra

    def start(self) -> "LocalVllmServer":
        out = subprocess.DEVNULL
        if self.log:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log, "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        finally:
            if self.log:
                out.close()
        return self

    def _tail(self) -> str:
        if not self.log:
            return ""
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "; see " + str(self.log) + ": " + " | ".join(lines[-3:])[-400:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HeaprError(f"vLLM for {self.folder} exited with code {self.proc.returncode} while loading{self._tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise HeaprError(f"vLLM for {self.folder} did not answer /health within {self.startup_timeout:g} s{self._tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "LocalVllmServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
