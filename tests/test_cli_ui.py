"""`reflow ui` starts the real Prefect and MLflow servers on loopback only, and stops them on Ctrl-C."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_both_on_loopback(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    prefect_port, mlflow_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(prefect_port), "--mlflow-port",
         str(mlflow_port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")},
        start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("MLflow UI:"):
                break
        text = "".join(seen)
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in text, text[-2000:]
        assert f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in text
        for url in (f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health"):
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
        listening = {c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        for port in (prefect_port, mlflow_port):
            hosts = {addr.ip for addr in listening if addr.port == port}
            assert hosts == {"127.0.0.1"}, hosts
        assert (tmp_path / "mlflow.db").exists(), "MLflow serves the project's own store"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)  # a deadline for Ctrl-C, generous for a loaded machine, not a speed check
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("reflow ui did not stop within 120 s of Ctrl-C:\n" + "".join(seen)[-2000:]) from None
