"""prefect-ray's task runner, with the workers of a cluster it starts itself warmed up together.

Each Ray worker imports torch, transformers, TRL and Prefect before its first task (``flows.env.ray_worker_setup``,
about 10 s on 2 busy cores). Ray starts workers on demand, so without a warm-up the first parallel stages of a
sweep wait for cold workers one after another; here one short task per CPU starts them all at once when the cluster
comes up. An existing cluster (``address``) is used as it is.
"""

from __future__ import annotations

import ray
from prefect_ray.task_runners import RayTaskRunner


@ray.remote(num_cpus=1)
def _warm() -> int:
    import os
    import time

    from flows.env import ray_worker_setup

    ray_worker_setup()  # also the setup hook's job; done here too so the warm-up waits for it
    time.sleep(0.5)  # hold the CPU a moment, so every warm-up task lands on a worker of its own
    return os.getpid()


class WarmRayTaskRunner(RayTaskRunner):
    def __enter__(self):
        super().__enter__()
        if self._owns_ray and not self.address:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            pids = ray.get([_warm.remote() for _ in range(cpus)])
            self.logger.info(f"Ray: {len(set(pids))} workers warm on {cpus} CPUs")
        return self
