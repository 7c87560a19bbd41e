"""A multi-node Ray cluster on this machine, every node on 127.0.0.1, until Ctrl-C.

    python tools/local_cluster.py --nodes 2 --cpus 1

starts a head and ``nodes - 1`` worker nodes (Ray's own ``ray.cluster_utils.Cluster``,
the start-up the CLI makes), prints the address, and stops every node it started on
Ctrl-C or SIGTERM. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (set here, and needed in
the environment of every driver that joins) Ray keeps its listeners on loopback.
A scaling sweep then runs its points concurrently, one Ray Train job per point (a
cluster needs a tracking server and an absolute or URI run storage, see docs/cluster.md):

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_TRACKING_URI=http://127.0.0.1:5000 make sweep SWEEP=micro_grid \\
        ARGS="hydra/launcher=joblib hydra.launcher.n_jobs=2 ray.address=<address> ray.cpus_per_worker=1 \\
              ray.storage_path=$PWD/checkpoints"

``--join ADDRESS`` starts one worker node that joins a running cluster instead (the
CLI refuses a second node on loopback): run it where the node should live, e.g. in a
mount namespace that hides the repository, to stand in for another machine.
``--info FILE`` writes the address and the PIDs of the started Ray processes as JSON
(a test kills a node's raylet by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

# Object store of each node (Ray's test default): the stages here move megabytes.
OBJECT_STORE_BYTES = 150 * 1024 * 1024
# Fast detection of a dead node (Ray's default is 5 missed checks 3 s apart).
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


def _pids(node) -> dict[str, list[int]]:
    return {kind: [info.process.pid for info in infos] for kind, infos in node.all_processes.items()}


def _write_info(path: str | None, info: dict) -> None:
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)  # a reader never sees half a file


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def join(address: str, cpus: int, resources: dict, info: str | None) -> int:
    """One worker node joining the cluster at ``address`` (the head's GCS), until a signal."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=address,
        node_ip_address="127.0.0.1",
        num_cpus=cpus,
        num_gpus=0,
        resources=resources,
        object_store_memory=OBJECT_STORE_BYTES,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        include_log_monitor=False,  # the head's monitor already reads this machine's logs
        dashboard_agent_listen_port=None,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    try:
        _write_info(info, {"address": address, "node_id": node.node_id, "pids": _pids(node)})
        print(f"Ray node {node.node_id[:8]} ({cpus} CPUs) joined {address}", flush=True)
        _wait_for_signal()
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="nodes in all, the head included")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each node offers")
    parser.add_argument("--resources", default="{}", help="custom resources of each node, JSON: '{\"device\": 1}'")
    parser.add_argument("--join", metavar="ADDRESS", help="start one worker node that joins this cluster")
    parser.add_argument("--info", metavar="FILE", help="write the address and the Ray processes' PIDs here")
    parser.add_argument(
        "--fast-failure-detection", action="store_true", help="declare a node dead after ~2 s of silence (tests)"
    )
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.cpus < 0:
        parser.error("--nodes must be >= 1 and --cpus >= 0")
    resources = json.loads(args.resources)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if args.join:
        return join(args.join, args.cpus, resources, args.info)
    from ray.cluster_utils import Cluster

    node = {"num_cpus": args.cpus, "node_ip_address": "127.0.0.1", "resources": resources}
    head = {**node, "include_dashboard": False}
    if args.fast_failure_detection:
        head["_system_config"] = FAST_HEALTH_CHECKS
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        info = {"address": cluster.address, "node_id": cluster.head_node.node_id, "pids": _pids(cluster.head_node)}
        _write_info(args.info, info)
        print(f"Ray cluster of {args.nodes} nodes x {args.cpus} CPUs at {cluster.address}", flush=True)
        print(f"  ray.address={cluster.address}", flush=True)
        _wait_for_signal()
    finally:
        cluster.shutdown()
        print("Ray cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
