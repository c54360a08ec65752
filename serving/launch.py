"""Starting and stopping a local ``bentoml serve`` of the inference API (tests, benchmarks, ``make serve``).

``python -m serving.launch [--port 3000]`` imports the configured alias, then serves it on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:CXRClassifier"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(port: int) -> list[str]:
    """The ``bentoml serve`` command line (127.0.0.1 only)."""
    return [str(Path(sys.executable).parent / "bentoml"), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def running_server(params: Path, log: Path, token: str = "", ready_timeout: float = 120) -> Iterator[str]:
    """Serves the model that ``params`` names until the block ends; yields the base URL.

    Args:
        params: the params.yaml the service reads (``DP_CXR_PARAMS``).
        log: file for the server's output.
        token: the bearer token to require (empty: no auth).
        ready_timeout: seconds to wait for ``/readyz``.

    Raises:
        RuntimeError: the server exited or did not become ready; the message ends with its log.
    """
    import httpx

    port = free_port()
    env = {**os.environ, "DP_CXR_PARAMS": str(Path(params).resolve()), "DP_CXR_API_TOKEN": token}
    with open(log, "w") as output:
        process = subprocess.Popen(command(port), cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve did not become ready:\n{Path(log).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> None:
    """Imports ``register.name@serve.alias`` into the BentoML store and serves it in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m serving.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    from serving.model_store import main as import_model

    import_model(["--params", str(args.params)])
    os.environ["DP_CXR_PARAMS"] = str(args.params.resolve())
    os.execv(command(args.port)[0], command(args.port))


if __name__ == "__main__":
    main()
