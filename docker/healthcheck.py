"""Container health probe: exit 0 when the server's ``GET /health`` answers 200, else 1.

The images run it as their ``HEALTHCHECK`` (they have no curl). The server may have been
given its port and host as environment variables (``COCONUT_PORT``) or as flags after the
image name (``docker run IMAGE --port 9000``); a flag wins, as in ``engine serve``, so the
probe reads PID 1's command line (the entrypoint) before the environment.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 4.0
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def setting(name: str, argv: list[str], env: dict[str, str], default: str) -> str:
    flag = "--" + name
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return env.get("COCONUT_" + name.upper(), default)


def health_url(argv: list[str], env: dict[str, str]) -> str:
    host = setting("host", argv, env, "127.0.0.1")
    port = setting("port", argv, env, "8000")
    # A server bound to every interface is reachable on loopback from inside the container.
    host = "127.0.0.1" if host in WILDCARDS else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/health"


def pid1_argv() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    url = health_url(pid1_argv() if argv is None else argv, dict(os.environ) if env is None else env)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as e:  # refused, timed out, HTTP 503 (HTTPError is an OSError)
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
