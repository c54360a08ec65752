"""The team's MLflow tracking server: PostgreSQL for runs and registry, served artifacts, basic auth, loopback only.

Every file of it lives in one folder (default ``.tracking-server/``, git-ignored):

    make tracking-server          # python -m pipelines.tracking_server start (.tracking-server/, port 5000)
    source .tracking-server/env   # MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
    dvc repro                     # every stage, the registry and the budget ledger now use the server
    make tracking-server-stop

PostgreSQL is the distribution's (``initdb``, ``pg_ctl``; run as the ``postgres`` user when started as root, as
PostgreSQL refuses root); the admin password is generated and written, readable by the owner only, to ``env``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.launch import free_port

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
DEFAULT_FOLDER = Path(".tracking-server")


@dataclass(frozen=True)
class TrackingServer:
    """A running server: where it listens and the credentials its clients use."""

    uri: str
    username: str
    password: str
    folder: Path

    def env(self) -> dict[str, str]:
        """The environment variables MLflow clients read."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL's tools refuse to run as root: as root, run them as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def start_postgres(folder: Path, port: int) -> str:
    """Initialises (once) and starts PostgreSQL on 127.0.0.1:``port`` with its data in ``folder``; its URI.

    A PostgreSQL of ``folder`` already running is used as it is (on its own port).

    Raises:
        RuntimeError: PostgreSQL is not installed or did not start; the message says where its log is.
    """
    if not (POSTGRES_BIN / "initdb").is_file():
        raise RuntimeError(f"PostgreSQL 15 is not installed ({POSTGRES_BIN}): apt-get install postgresql-15")
    data = folder / "postgres"
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    if not (data / "PG_VERSION").is_file():
        subprocess.run(_as_postgres([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
                                     "-E", "UTF8"]), check=True, capture_output=True)
    log = folder / "postgres.log"
    port_file = folder / "postgres.port"
    status = subprocess.run(_as_postgres([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "status"]),
                            capture_output=True)
    if status.returncode == 0 and port_file.is_file():     # still running (only mlflow server stopped): reuse it
        port = int(port_file.read_text())
    else:
        subprocess.run(_as_postgres([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                                     f"-h 127.0.0.1 -p {port} -k {folder.resolve()}", "start"]),
                       check=True, capture_output=True)
        port_file.write_text(str(port))
    created = subprocess.run([str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow",
                              "mlflow"], capture_output=True, text=True)
    if created.returncode and "already exists" not in created.stderr:
        raise RuntimeError(f"cannot create the mlflow database: {created.stderr.strip()} (log: {log})")
    return f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"


def start(folder: Path = DEFAULT_FOLDER, port: int = 5000, ready_timeout: float = 120) -> TrackingServer:
    """Starts PostgreSQL and ``mlflow server`` (basic auth, served artifacts) on 127.0.0.1 and waits until ready.

    Raises:
        RuntimeError: a part did not start; the message ends with the server's log.
    """
    import httpx

    folder = folder.resolve()
    postgres = start_postgres(folder, free_port())
    credentials = folder / "env"
    if credentials.is_file():
        saved = dict(line.removeprefix("export ").split("=", 1) for line in credentials.read_text().splitlines())
        password = saved["MLFLOW_TRACKING_PASSWORD"]
    else:
        password = secrets.token_urlsafe(18)
    auth = folder / "basic_auth.ini"
    # MLflow's credential cache (HMAC-keyed, in the server's memory, 5 minutes): without it every request pays a
    # deliberate slow password hash, ~0.3 s here, which is most of a logging call's time.
    auth.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {postgres}\n"
                    f"admin_username = admin\nadmin_password = {password}\nauthorization_function = "
                    f"mlflow.server.auth:authenticate_request_basic_auth\nauth_cache_ttl_seconds = 300\n")
    auth.chmod(0o600)
    server = TrackingServer(f"http://127.0.0.1:{port}", "admin", password, folder)
    credentials.write_text("".join(f"export {k}={v}\n" for k, v in server.env().items()))
    credentials.chmod(0o600)
    log = folder / "server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", postgres,
               "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--app-name", "basic-auth", "--workers", "2"]
    secret = folder / "flask_secret"        # the auth app's CSRF key: the same across restarts and workers
    if not secret.is_file():
        secret.write_text(secrets.token_urlsafe(32))
        secret.chmod(0o600)
    # MLflow 3's job runner (GenAI scorers, trace roll-ups) is not used here: its half-dozen worker processes
    # would only take cores from training.
    environment = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth),
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secret.read_text(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "a") as output:
        process = subprocess.Popen(command, env=environment,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "server.pid").write_text(str(process.pid))
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            stop(folder)
            raise RuntimeError(f"mlflow server did not become ready:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.uri}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_server(folder: Path = DEFAULT_FOLDER) -> None:
    """Stops ``mlflow server`` (its process group), leaving PostgreSQL running."""
    pid_file = folder / "server.pid"
    if not pid_file.is_file():
        return
    group = int(pid_file.read_text())
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 30     # until its port is free for a restart
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                os.waitpid(group, os.WNOHANG)     # reap it when this process started it (no zombie left)
            except ChildProcessError:
                pass
            os.killpg(group, 0)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink()


def stop(folder: Path = DEFAULT_FOLDER) -> None:
    """Stops ``mlflow server`` and PostgreSQL (the data stays in ``folder``)."""
    folder = folder.resolve()
    stop_server(folder)
    if (folder / "postgres" / "postmaster.pid").is_file():
        subprocess.run(_as_postgres([str(POSTGRES_BIN / "pg_ctl"), "-D", str(folder / "postgres"), "-m", "fast",
                                     "-w", "stop"]), capture_output=True)


@contextmanager
def running(folder: Path, port: int | None = None) -> Iterator[TrackingServer]:
    """A tracking server for the duration of the block (tests, benchmarks)."""
    server = start(folder, port or free_port())
    try:
        yield server
    finally:
        stop(folder)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.tracking_server start|stop [--folder .tracking-server] [--port 5000]``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking_server", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.folder)
        return
    try:
        server = start(args.folder, args.port)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        print(f"tracking_server: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"MLflow tracking server on {server.uri} (PostgreSQL, basic auth); its clients need: "
          f"source {args.folder / 'env'}")


if __name__ == "__main__":
    main()
