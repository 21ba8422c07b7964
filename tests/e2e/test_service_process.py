"""The service processes of a local network (`iopnet run`, `iopnet bench`), as the kernel
and the interpreter see them (issue 10):
- each keeps what it built to start out of the garbage collector's full collections: under
  `iopnet bench --postgres` a full collection walked that heap for up to 240 ms in intake
  and 460 ms in notifications, each a pause of the event loop. The tests' own apps, built
  in this process, do not: a test process that froze each one would keep its garbage;
- each runs in a session of its own, as a container in a cgroup of its own, and a process
  doing routine work only gives its session the lower CPU weight."""

import gc
import os

import httpx

from iopnet.network import ROUTINE_NICENESS, LocalNetwork
from shared.runtime import session_niceness

# A service's startup heap is some 170,000 objects (modules, models, routes, schemas).
STARTUP_HEAP_AT_LEAST = 50_000


def frozen_objects(metrics: str) -> float:
    values = [line.split()[-1] for line in metrics.splitlines() if line.startswith("iopnet_gc_frozen_objects ")]
    assert len(values) == 1, values
    return float(values[0])


async def test_each_service_process_keeps_its_startup_heap_out_of_full_collections(network: LocalNetwork) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for instance in network.instances:
            response = await http.get(f"{network.url(instance)}/metrics")
            assert response.status_code == 200, instance
            assert frozen_objects(response.text) > STARTUP_HEAP_AT_LEAST, instance
    assert gc.get_freeze_count() == 0  # this process built apps too, and froze nothing


def test_each_service_process_leads_a_session_whose_weight_is_its_own(network: LocalNetwork) -> None:
    for instance, process in network.processes.items():
        assert os.getsid(process.pid) == process.pid, instance
        wanted = ROUTINE_NICENESS if network.routine_only(instance) else 0
        assert session_niceness(process.pid) == wanted, instance
    assert any(network.routine_only(instance) for instance in network.processes)  # scheduling
