"""A service run by `iopnet serve` keeps what it built to start out of the garbage
collector's full collections (issue 10): under `iopnet bench --postgres` a full collection
walked that heap for up to 240 ms in intake and 460 ms in notifications, each a pause of
the event loop. The tests' own apps, built in this process, do not: a test process that
froze each one would keep its garbage for good."""

import gc

import httpx

from iopnet.network import LocalNetwork

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
