"""The demo's ``--s3`` mode stopped from outside: its SeaweedFS server and running stage go with it, on one
line and no traceback, and the next demo into the same ``--out`` starts.

A ``weed`` left running holds its data folder's lock, so the next demo's server exited with code 255. The
demo runs as ``scripts/demo.sh`` runs it (that script only ``exec``s ``scripts/demo.py`` once the venv is
set up), stopped once its server is up and the sharding stage has started (~20 s a run); the other ways
out are checked on the part of the demo that runs the server (~8 s each).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE = "data_pipeline.shard_latents"  # the stage that runs once the S3 server is up and has its bucket


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE  # (reaped by whoever adopts it)
    except psutil.NoSuchProcess:
        return True


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # ended meanwhile, or a zombie
        return ""


def weeds_of(data_dir: Path) -> list[psutil.Process]:
    """The live ``weed`` servers on ``data_dir``, whoever started them."""
    flag = f"-dir={data_dir}"
    return [p for p in psutil.process_iter() if flag in cmdline(p).split() and not gone(p)]


def leave_a_server(data_dir: Path) -> None:
    """What a demo killed with SIGKILL leaves: a server on its data, whose parent is gone."""
    start = f"from s3_server import SeaweedServer; SeaweedServer({str(data_dir)!r}).start()"
    subprocess.run([sys.executable, "-c", start], cwd=REPO / "tests", check=True, timeout=60)


def start_and_stop(out: Path, signum: int, timeout: float = 60.0) -> tuple[int, str, list[psutil.Process]]:
    """Start the demo in S3 mode, send ``signum`` once its sharding stage runs; (exit code, stderr, the
    processes it had started: the server and the stage)."""
    cmd = [sys.executable, "scripts/demo.py", "--s3", "--out", str(out), "--steps", "2"]
    demo = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            started = psutil.Process(demo.pid).children(recursive=True)
            if any(STAGE in cmdline(p) for p in started):
                break
            assert demo.poll() is None, f"the demo ended before its S3 stage: {demo.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the demo's sharding stage did not start"
            time.sleep(0.1)
        assert any(p.name() == "weed" for p in started)
        demo.send_signal(signum)
        _, err = demo.communicate(timeout=timeout)
        return demo.returncode, err, started
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


@pytest.mark.slow
def test_demo_stopped_by_a_signal_stops_its_s3_server_and_restarts(tmp_path):
    out = tmp_path / "demo"
    leave_a_server(out / "s3_data")
    (left,) = weeds_of(out / "s3_data")
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):  # the second run restarts after the first
            code, err, started = start_and_stop(out, signum)
            name = signal.Signals(signum).name
            assert code == 128 + signum and "Traceback" not in err, err
            assert err.strip().splitlines()[-1] == f"demo: stopped by {name}", err
            assert gone(left) and left not in started  # the first run stopped it, then started its own
            assert [p for p in started if not gone(p)] == [], f"left running after {name}"
            assert weeds_of(out / "s3_data") == []
    finally:
        for proc in weeds_of(out / "s3_data"):  # only if the demo failed to: nothing outlives the test
            proc.kill()


SERVER_ONLY = """
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
import demo

def main():  # the demo's stages while its server is up: on a line from the test they end or fail
    with demo.local_s3(Path(sys.argv[1])):
        print("up", flush=True)
        if sys.stdin.readline() == "fail\\n":
            sys.exit("demo: a stage failed")

demo.main = main
sys.exit(demo.cli())
"""


@pytest.mark.parametrize("way_out", ["end", "fail", "SIGHUP"])
def test_demo_server_stops_on_every_way_out(tmp_path, way_out):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-c", SERVER_ONLY, str(out), way_out]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    demo = subprocess.Popen(cmd, cwd=REPO, text=True, **pipes)
    try:
        assert demo.stdout.readline() == "up\n", demo.stderr.read()
        (server,) = weeds_of(out / "s3_data")
        if way_out.startswith("SIG"):
            demo.send_signal(signal.Signals[way_out])
        _, err = demo.communicate(None if way_out.startswith("SIG") else f"{way_out}\n", timeout=60)
        want = {
            "end": (0, ""),
            "fail": (1, "demo: a stage failed"),
            "SIGHUP": (129, "demo: stopped by SIGHUP"),
        }
        assert (demo.returncode, err.strip()) == want[way_out]
        assert gone(server) and weeds_of(out / "s3_data") == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for proc in weeds_of(out / "s3_data"):
            proc.kill()
