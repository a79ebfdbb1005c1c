"""A build that cannot succeed ends `serve run` instead of leaving it waiting.

`serve run serve.config` hands the build to Serve's controller, which retries a failed build and then leaves the
application DEPLOY_FAILED, while the command itself sleeps on forever. A missing or unreadable artifact or a bad
config fails every retry the same way, so `build_app` calls `stop_serve_run` with its message: the message goes where
the command prints its logs, and the command's process ends with a non-zero status. Only a `serve run` process on
this machine is stopped; where Serve is driven otherwise (KubeRay, `serve deploy`), the failure stays in the
application's status, which is how those report it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

LOG_FORWARDING_S = 3.0  # time for Ray to forward the message to the command's terminal before it ends


def _is_serve_run(entrypoint: str) -> bool:
    words = entrypoint.split()
    return any(Path(word).name == "serve" and words[index + 1:index + 2] == ["run"] for index, word in enumerate(words))


def stop_serve_run(message: str) -> bool:
    """Print `message` and end the `serve run` process that is waiting for this build; whether there was one."""
    import ray
    from ray._private import state, worker

    if not ray.is_initialized() or worker.global_worker.mode != ray.WORKER_MODE:
        return False  # called from a driver (`serve.run(build_app(...))`): the exception reaches the caller
    job_id = ray.get_runtime_context().get_job_id()
    driver = next((job for job in state.state.job_table() if job["JobID"] == job_id), None)
    if (driver is None or driver["IsDead"] or not _is_serve_run(driver["Entrypoint"])
            or driver["DriverIPAddress"] != ray.util.get_node_ip_address()):
        return False
    print(f"error: the application cannot be built: {message}", file=sys.stderr, flush=True)
    time.sleep(LOG_FORWARDING_S)
    os.kill(driver["DriverPid"], signal.SIGTERM)  # Ray's driver exits with status 15 on SIGTERM
    return True
