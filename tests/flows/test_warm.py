"""The warm pool: workers spawned before the flow starts run its tasks, and are stopped (not waited for) after it."""

import os
import time

import pytest

from flows import warm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_flow_runs_its_tasks_on_the_workers_spawned_before_it_and_stops_them():
    from prefect import flow, task

    pool = warm.start_warm_pool(2, preload=("json",))
    for f in pool.warming:
        f.result(timeout=120)
    warm_pids = pool.pids
    assert len(warm_pids) == 2 and all(_alive(p) for p in warm_pids)

    @task
    def pid_task():
        import os

        return os.getpid()

    @flow(task_runner=warm.make_task_runner(2))
    def pids():
        return [f.result() for f in [pid_task.submit() for _ in range(4)]]

    ran_on = set(pids())
    assert ran_on <= warm_pids, "the tasks ran on workers the runner spawned itself, not the warm ones"
    assert os.getpid() not in ran_on
    deadline = time.time() + 10
    while any(_alive(p) for p in warm_pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in warm_pids), "the runner left its workers running"
    assert warm._POOL is None  # claimed: the next runner starts a pool of its own unless warmed again


def test_a_warm_pool_for_another_number_of_workers_is_not_claimed_and_a_discarded_one_stops():
    pool = warm.start_warm_pool(1, preload=())
    pool.warming[0].result(timeout=120)
    (pid,) = pool.pids
    assert warm._claim(2) is None and warm._POOL is pool
    warm.discard_warm_pool()
    assert warm._POOL is None
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_a_task_error_still_reaches_the_flow_on_a_warm_pool():
    from prefect import flow, task

    @task
    def boom():
        raise ValueError("this stage broke")

    warm.start_warm_pool(1)

    @flow(task_runner=warm.make_task_runner(1))
    def breaks():
        return boom.submit().result()

    with pytest.raises(ValueError, match="this stage broke"):
        breaks()


def test_a_task_process_spawns_no_workers_for_its_copy_of_the_flows_runner():
    """Prefect enters a copy of the flow's task runner in every task process (``hydrated_context``); that copy never
    runs a task, so it must not spawn a pool: a process per stage, importing torch beside the stage, made every stage
    slower (basic: evaluate 2.2 s against 0.5 s direct; 16 such processes in one flow)."""
    from prefect import flow, task

    @task
    def children_of_the_task_process():
        import multiprocessing

        return len(multiprocessing.active_children())

    warm.start_warm_pool(1)

    @flow(task_runner=warm.make_task_runner(1))
    def count():
        return children_of_the_task_process.submit().result()

    assert count() == 0
    runner = warm.make_task_runner(1)  # no warm pool left to claim: Prefect's own runner, workers spawned on submit
    with runner:
        assert not getattr(runner._executor, "_processes", None)


def _worker_facts():
    import os

    return os.getpid(), os.getppid(), os.environ.get("ROADS_HOME"), os.getcwd()


def _facts_of(pool):
    for future in pool.warming:
        future.result(timeout=120)
    return pool.executor.submit(_worker_facts).result(timeout=60)


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="no fork server on this platform: the workers are spawned")
def test_later_pools_fork_their_workers_from_one_fork_server_with_the_flows_current_environment(
        tmp_path, monkeypatch):
    from multiprocessing import forkserver

    first = warm.start_warm_pool(1)
    _, server, _, _ = _facts_of(first)
    assert server == forkserver._forkserver._forkserver_pid, "the worker was not forked from the fork server"
    warm.discard_warm_pool()

    # ROADS_HOME is read when called: a new value does not restart the server, and the worker is given it
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "another-home"))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    second = warm.start_warm_pool(1)
    _, parent, home, cwd = _facts_of(second)
    started = time.perf_counter() - start
    warm.discard_warm_pool()
    assert parent == server, "the second pool started another fork server"
    assert home == str(tmp_path / "another-home") and cwd == str(tmp_path)
    # nothing to import: milliseconds, where a fresh worker imports torch and TRL for seconds
    assert started < 2.0, f"a worker of a running fork server took {started:.1f} s to start"


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="no fork server on this platform: the workers are spawned")
def test_a_changed_module_or_import_time_setting_restarts_the_fork_server(monkeypatch):
    from multiprocessing import forkserver

    _, server, _, _ = _facts_of(warm.start_warm_pool(1))
    warm.discard_warm_pool()

    before = warm.fork_fingerprint()
    module = warm.ROOT / "roads" / "settings.py"  # a module the fork server imported (roads.training imports it)
    stat = module.stat()
    try:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as an edit would
        assert warm.fork_fingerprint() != before
        _, restarted, _, _ = _facts_of(warm.start_warm_pool(1))
        warm.discard_warm_pool()
    finally:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert restarted != server and restarted == forkserver._forkserver._forkserver_pid, \
        "a worker forked from a fork server that imported the old module"

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read when huggingface_hub is imported
    assert warm.fork_fingerprint() != before
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ROADS_HOME", "/elsewhere")  # read when called
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/elsewhere")  # torch sets it in the flow process as it runs
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert warm.fork_fingerprint() == before


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="no fork server on this platform: the workers are spawned")
def test_a_process_that_exits_early_ends_its_fork_server_at_once():
    """A study that fails right after its warm pool started: its fork server, still importing torch and the rest,
    ends with it instead of importing on for seconds."""
    import subprocess
    import sys

    code = ("import time\nfrom multiprocessing import forkserver\nfrom flows import warm\n"
            "warm.start_warm_pool(1)\n"
            "while forkserver._forkserver._forkserver_pid is None: time.sleep(0.01)\n"
            "print(forkserver._forkserver._forkserver_pid, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=warm.ROOT, capture_output=True, text=True, timeout=120)
    pid = int(proc.stdout.split()[0])
    deadline = time.time() + 2  # importing FORK_PRELOAD takes 4-5 s here
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    if _alive(pid):  # a zombie (exited, not yet reaped by init) counts as ended
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().split()[2] == "Z", "the fork server outlived its process"


def test_each_warming_call_gets_a_worker_of_its_own(monkeypatch):
    """The pool spawns a worker for a call only when none is idle: a worker forked in milliseconds that ran its
    warming call before the next was submitted took that one too, and a pool of 2 started 1 worker (seen once in CI).
    Here the starter thread is slowed between its calls; each worker waits in its initializer for the others."""
    from concurrent.futures import ProcessPoolExecutor

    submit = ProcessPoolExecutor.submit

    def slow_submit(self, *args, **kwargs):
        future = submit(self, *args, **kwargs)
        time.sleep(2.0)  # the starter descheduled: the first worker has long finished starting
        return future

    monkeypatch.setattr(ProcessPoolExecutor, "submit", slow_submit)
    pool = warm.start_warm_pool(2, preload=("json",))
    try:
        for future in pool.warming:
            future.result(timeout=120)
        assert len(pool.pids) == 2 and all(_alive(p) for p in pool.pids)
    finally:
        warm.discard_warm_pool()
