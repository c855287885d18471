"""Imported at start-up by every process of a test DDP script (``tests.helpers.run_ddp_script`` puts this folder on
``PYTHONPATH``; relaunched and spawned ranks inherit it): at exit, a rank that still holds a process group waits
for the others at a barrier, then destroys the group. Left to the interpreter's shutdown, a gloo group torn down
while another rank's last collective was still in flight aborted the process now and then ("terminate called
without an active exception")."""

import atexit
import sys
from datetime import timedelta


def _tear_down_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:  # a rank that died early makes the others wait at most a minute here
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - exiting anyway; the test reads the script's own output
        pass
    dist.destroy_process_group()


atexit.register(_tear_down_process_group)
