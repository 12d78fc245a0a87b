"""Nothing we start listens beyond this machine unless asked: the scheduler, the nannies, the workers and the
dashboards of a job's local cluster and of ``gerelion cluster start`` bind 127.0.0.1.

Oracle: the operating system's table of listening sockets (psutil) for the processes involved, not our own
configuration: every listening TCP socket of the scheduler's process and of its worker processes is on a loopback
address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from urllib.parse import urlparse

import psutil
import pytest
from conftest import cluster_cli



def _listening(proc: psutil.Process) -> list:
    conns = getattr(proc, "net_connections", None) or proc.connections
    return [c.laddr for c in conns(kind="inet") if c.status == psutil.CONN_LISTEN]


def _assert_loopback(addrs, what):
    assert addrs, f"{what}: no listening socket found"
    for a in addrs:
        assert ipaddress.ip_address(a.ip).is_loopback, f"{what} listens on {a.ip}:{a.port}"


def _host(url: str) -> str:
    return urlparse(url if "://" in url else "tcp://" + url).hostname


def test_local_cluster_of_a_job_listens_on_loopback_only():
    from gerelion_dask.distributed.cluster import close_client, make_client

    client, cluster = make_client(n_workers=1, gpus=False)  # the defaults a job uses (dashboard 127.0.0.1:8787)
    try:
        client.wait_for_workers(1, timeout=60)
        info = client.scheduler_info(n_workers=-1)
        assert _host(cluster.scheduler_address) == "127.0.0.1"
        assert _host(client.dashboard_link) == "127.0.0.1"
        for addr, w in info["workers"].items():
            assert _host(addr) == "127.0.0.1" and _host(w["nanny"]) == "127.0.0.1", (addr, w["nanny"])
        ports = {int(urlparse(cluster.scheduler_address).port), int(urlparse(client.dashboard_link).port)}
        me = psutil.Process()
        mine = _listening(me)
        assert ports <= {a.port for a in mine}  # the scheduler and its dashboard live in this process
        _assert_loopback(mine, "the scheduler's process")
        pids = client.run(os.getpid)
        for addr, pid in pids.items():
            _assert_loopback(_listening(psutil.Process(pid)), f"worker {addr}")
    finally:
        close_client(client, cluster)


@pytest.mark.slow
def test_cluster_service_listens_on_loopback_only(tmp_path):
    sched = tmp_path / "scheduler.json"

    def cli(*args):
        return cluster_cli(sched, *args, timeout=120)

    started = cli("start", "--workers", "1")  # default dashboard address
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert _host(json.loads(sched.read_text())["address"]) == "127.0.0.1"
        state = json.loads(sched.with_name(sched.name + ".service.json").read_text())
        service = psutil.Process(state["pid"])
        procs = [service, *service.children(recursive=True)]
        t0 = time.time()
        while len(procs) < 2 and time.time() - t0 < 30:  # the worker process
            time.sleep(0.5)
            procs = [service, *service.children(recursive=True)]
        socks = []
        for p in procs:
            try:
                socks += [(p.pid, a) for a in _listening(p)]
            except psutil.NoSuchProcess:  # e.g. a short-lived helper
                pass
        assert len({a.port for _, a in socks}) >= 3, socks  # scheduler, dashboard, worker (at least)
        for pid, a in socks:
            assert ipaddress.ip_address(a.ip).is_loopback, f"process {pid} listens on {a.ip}:{a.port}"
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
