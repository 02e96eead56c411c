"""Is a Triton server serving our models? Ready and live, as the pod (and ``serve status``) reports it.

Triton 2.51 never restarts a Python-backend stub that died (killed, out of memory): every later
request to that model fails with "Stub process '<instance>' is not healthy." while
``/v2/health/ready`` and the model's own ready endpoint stay 200 (upstream
triton-inference-server/server#7230, #8604). So besides Triton's endpoints this counts, for each
model, the stub processes alive on this machine (the pod's own process namespace) against the
instances its config asks for. The runtime's liveness probe runs it: a dead stub fails the probe
and the kubelet restarts the container, which loads the model again.

``python -m handler.triton_health [--url http://127.0.0.1:8080]``: exit 0 when serving, else 1
with the reason. Standard library only: the probe runs every few seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

MODELS = ("wan_stream", "wan")
STUB = "triton_python_backend_stub"


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    # Straight to the server: a probe never goes through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:
        return 0, str(error).encode()


def _parent(entry: Path) -> int | None:
    try:
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def live_stubs(proc: Path = Path("/proc"), server_pid: int | None = None) -> dict[str, int]:
    """Live Python-backend stubs by model name, from their command lines (``... <instance>
    DEFAULT``, the instance named ``<model>_<group>_<index>``). A zombie has no command line.
    ``server_pid``: count only that tritonserver's children (several servers on one machine);
    None: every stub (a pod runs one server)."""
    counts: dict[str, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if server_pid is not None and argv and argv[0].endswith(STUB.encode()) and _parent(entry) != server_pid:
            continue
        if not argv or not argv[0].endswith(STUB.encode()):
            continue
        for arg in argv[1:]:
            match = re.fullmatch(rb"(.+)_\d+_\d+", arg)
            if match:
                name = match.group(1).decode(errors="replace")
                counts[name] = counts.get(name, 0) + 1
                break
    return counts


def _instances(config: dict) -> int:
    return sum(int(group.get("count", 1)) for group in config.get("instance_group") or [{"count": 1}])


def check(url: str, models: tuple[str, ...] = MODELS, timeout_s: float = 5.0,
          server_pid: int | None = None) -> str | None:
    """None when Triton answers ready and every model has all its stubs alive; else the reason."""
    status, _ = _get(f"{url}/v2/health/ready", timeout_s)
    if status != 200:
        return f"Triton is not ready ({status or 'no answer'} from {url}/v2/health/ready)"
    stubs = live_stubs(server_pid=server_pid)
    for model in models:
        status, body = _get(f"{url}/v2/models/{model}/config", timeout_s)
        if status != 200:
            return f"model {model} is not loaded ({status})"
        wanted = _instances(json.loads(body))
        if stubs.get(model, 0) < wanted:
            return (f"model {model} has {stubs.get(model, 0)} of its {wanted} backend stub(s) alive: Triton does "
                    "not restart a dead stub, the server must restart")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="Triton's HTTP endpoint")
    args = parser.parse_args(argv)
    problem = check(args.url.rstrip("/"))
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
