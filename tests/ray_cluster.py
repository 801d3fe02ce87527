"""A real two-node Ray cluster on this machine for tests: a head and a worker node started with `ray start`,
each in its own temp dir and on its own loopback address, with token authentication, and stopped again
whatever happens (no other Ray on the machine is touched: no `ray stop`, no ~/.ray, no /tmp/ray).

Why the details:
- 127.0.0.2 / 127.0.0.3, not 127.0.0.1: Ray rewrites 127.0.0.1 to the machine's network address
  (`services.resolve_ip_for_localhost`); other loopback addresses are kept, so all traffic stays on
  loopback and each node has an address of its own.
- every port Ray would otherwise default (GCS 6379, dashboard 8265, agent 52365, client server 10001) is a
  free one, so a Ray someone else runs here never collides with this one.
- own `--temp-dir`s: a plain `ray.init()` elsewhere finds clusters through /tmp/ray/ray_current_cluster and
  would join this one if it were written there.
- own token file (RAY_AUTH_TOKEN_PATH): the user's ~/.ray/auth_token is neither read nor written.
- `ray start --block` in its own session: SIGTERM to it stops that node's processes; anything left over
  (job drivers, workers) carries VISEG_TEST_CLUSTER=<root> in its environment and is killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray`, and the `python` a job's entrypoint runs
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
MARKER = "VISEG_TEST_CLUSTER"


class ClusterError(AssertionError):
    """A cluster or job did not do what the test waited for; the message carries the logs to read."""


def free_ports(n: int) -> list[int]:
    """Ports free on every interface; all sockets stay open until the last is bound, so none repeats."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("0.0.0.0", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _clean_environment() -> dict[str, str]:
    """This process's environment without another cluster's address or credentials."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class LocalCluster:
    """Head + one worker node, 1 CPU and no GPU each; jobs go through the dashboard's Jobs API."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token_file = root / "auth_token"
        self.shared = root / "shared"  # what a shared filesystem is on a real cluster
        gcs, dashboard, client, head_agent, worker_agent = free_ports(5)
        self.gcs_address = f"{HEAD_IP}:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self._ports = {"client": client, "head_agent": head_agent, "worker_agent": worker_agent,
                       "dashboard": dashboard, "gcs": gcs}
        self._nodes: list[subprocess.Popen] = []

    # -- environments -------------------------------------------------------------------------------------

    def node_env(self) -> dict[str, str]:
        """What the nodes (and so every job driver and worker) run with: token auth on, our token file."""
        return _clean_environment() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                                       "RAY_USAGE_STATS_ENABLED": "0", MARKER: str(self.root)}

    def client_env(self) -> dict[str, str]:
        """A user's shell: knows the address and the token file; RAY_AUTH_MODE is left to submit.sh."""
        return _clean_environment() | {"RAY_ADDRESS": self.dashboard_url,
                                       "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    # -- start and stop -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.shared.mkdir(parents=True)
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        p = self._ports
        self._start_node("head", "--head", "--node-ip-address", HEAD_IP, "--port", str(p["gcs"]),
                         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p["dashboard"]),
                         "--ray-client-server-port", str(p["client"]),
                         "--dashboard-agent-listen-port", str(p["head_agent"]))
        self._wait_for_nodes(1)
        self._start_node("worker", "--address", self.gcs_address, "--node-ip-address", WORKER_IP,
                         "--dashboard-agent-listen-port", str(p["worker_agent"]))
        self._wait_for_nodes(2)

    def _start_node(self, name: str, *args: str) -> None:
        with open(self.root / f"{name}.log", "w") as log:
            self._nodes.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--num-cpus", "1", "--num-gpus", "0",
                 "--temp-dir", str(self.root / name), "--disable-usage-stats", *args],
                stdout=log, stderr=subprocess.STDOUT, env=self.node_env(), start_new_session=True))

    def _wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        def ready() -> bool:
            for node in self._nodes:
                if node.poll() is not None:
                    raise ClusterError(f"`ray start` exited with {node.returncode}:\n{self.node_logs()}")
            with contextlib.suppress(OSError, ValueError, ClusterError):
                return len(self.alive_node_ids()) >= n
            return False

        wait_until(ready, timeout, f"{n} alive Ray node(s)", lambda: self.node_logs())

    def node_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Jobs first (so no driver outlives its node), then each `ray start --block`, then any leftover."""
        with contextlib.suppress(Exception):
            for job in self.api("/api/jobs/"):
                if job.get("status") not in TERMINAL:
                    self.api(f"/api/jobs/{job['submission_id']}/stop", method="POST")
        for node in reversed(self._nodes):
            _terminate_group(node)
        _kill_marked_processes(self.root)

    # -- the dashboard's REST APIs ------------------------------------------------------------------------

    def api(self, path: str, method: str = "GET", token: str | None = None) -> Any:
        """JSON from the dashboard, authenticated like the Ray CLI: `Authorization: Bearer <token>`."""
        token = self.token_file.read_text().strip() if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.dashboard_url + path, method=method, headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        with opener.open(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def status_code_without_token(self, path: str) -> int:
        try:
            self.api(path, token="")
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    def alive_node_ids(self) -> set[str]:
        nodes = self.api("/api/v0/nodes")["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def job(self, submission_id: str) -> dict[str, Any]:
        return self.api(f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        with contextlib.suppress(OSError, ValueError):
            return self.api(f"/api/jobs/{submission_id}/logs").get("logs", "")
        return "(job logs unavailable)"

    # -- jobs -----------------------------------------------------------------------------------------------

    def submit(self, submission_id: str, *sweep_args: str) -> None:
        """launch/submit.sh, as launch/README.md runs it, without waiting for the job."""
        result = subprocess.run(["bash", str(REPO / "launch" / "submit.sh"), "--no-wait", "--submission-id",
                                 submission_id, *sweep_args], cwd=self.root, env=self.client_env(),
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise ClusterError(f"submit.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` command as the README's user runs it (RAY_AUTH_MODE=token exported in the shell)."""
        return subprocess.run([str(BIN / "ray"), *args], env=self.client_env() | {"RAY_AUTH_MODE": "token"},
                              capture_output=True, text=True, timeout=timeout)

    def wait_for_status(self, submission_id: str, expected: str, timeout: float) -> dict[str, Any]:
        """Poll the Jobs API until the job is terminal; anything but `expected` fails with its logs."""
        state: dict[str, Any] = {}

        def terminal() -> bool:
            state.update(self.job(submission_id))
            return state.get("status") in TERMINAL

        wait_until(terminal, timeout, f"job {submission_id} to end", lambda: self.logs(submission_id))
        if state["status"] != expected:
            raise ClusterError(f"job {submission_id} ended {state['status']} ({state.get('message')}), "
                               f"expected {expected}; its logs:\n{self.logs(submission_id)[-6000:]}")
        return state

    def wait_while_running(self, submission_id: str, condition: Callable[[], bool], what: str,
                           timeout: float = 420) -> None:
        """Poll `condition` while the job runs; the job ending first is a failure that shows its logs."""
        def check() -> bool:
            if condition():
                return True
            status = self.job(submission_id).get("status")
            if status in TERMINAL:
                raise ClusterError(f"job {submission_id} ended {status} before {what}:\n"
                                   f"{self.logs(submission_id)[-6000:]}")
            return False

        wait_until(check, timeout, what, lambda: self.logs(submission_id))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}:\n{details()[-6000:]}")
        time.sleep(0.5)


def _terminate_group(node: subprocess.Popen) -> None:
    """SIGTERM lets `ray start --block` stop its node's processes, but it takes about 30 s per node for a
    graceful shutdown a throwaway cluster does not need: after a few seconds its process group is killed."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 30)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=wait)
            return


def _marked_pids(root: Path) -> list[int]:
    """Processes started for this cluster: their environment names its root (inherited from the nodes)."""
    marker = f"{MARKER}={root}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes().split(b"\0") and not _is_zombie(environ.parent):
                pids.append(int(environ.parent.name))
    return [pid for pid in pids if pid != os.getpid()]


def _is_zombie(proc: Path) -> bool:
    """Already dead, waiting to be reaped (this container's init may never do it): nothing left to kill."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _kill_marked_processes(root: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (pids := _marked_pids(root)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """Start the cluster; stop it and remove its files on the way out, also after a failed start."""
    # a short root under /tmp: Ray's unix socket paths (<temp-dir>/session_.../sockets/...) must stay
    # under the 107-character limit, which pytest's tmp_path can exceed
    root = Path(tempfile.mkdtemp(prefix="viseg-ray-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
