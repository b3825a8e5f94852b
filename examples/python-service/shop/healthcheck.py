"""The containers' health checks (docker-compose.yml): `python -m shop.healthcheck app|worker|beat`
exits 0 when the container is healthy, 1 with a reason on stderr when it is not.

- app: the web app answers `GET /healthz` (which asks the database) on UVICORN_PORT.
- worker: this host's Celery worker answers a ping through the broker.
- beat: some replica leads `beat` (`pglock status` shows the leadership held). A standby is as
  healthy as the leader: it stands ready to take over.
"""

import json
import os
import socket
import subprocess
import sys
import urllib.request


def app() -> str | None:
    port = os.environ.get("UVICORN_PORT", "8000")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return None if response.status == 200 else f"/healthz answered {response.status}"


def worker() -> str | None:
    from shop.celery import app

    node = f"celery@{socket.gethostname()}"
    replies = app.control.ping(destination=[node], timeout=5)
    return None if replies else f"{node} did not answer a ping"


def beat() -> str | None:
    status = subprocess.run(
        ["pglock", "status", "--json", "--name", "leader:beat", "--connect-timeout", "5s"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if status.returncode != 0:
        return f"pglock status exited {status.returncode}: {status.stderr.strip()}"
    locks = json.loads(status.stdout)["locks"]
    return None if any(lock["state"] == "held" for lock in locks) else "no replica leads beat"


if __name__ == "__main__":
    checks = {"app": app, "worker": worker, "beat": beat}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: python -m shop.healthcheck {'|'.join(checks)}")
    try:
        problem = checks[sys.argv[1]]()
    except Exception as error:  # any failure to check is unhealthy
        problem = f"{type(error).__name__}: {error}"
    if problem:
        sys.exit(f"unhealthy: {problem}")
