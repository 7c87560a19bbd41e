"""A multi-node Ray cluster on this machine, every node on 127.0.0.1, until Ctrl-C.

    python tools/local_cluster.py --nodes 2 --cpus 1

starts a head and ``nodes - 1`` worker nodes (Ray's own ``ray.cluster_utils.Cluster``,
the start-up the CLI makes), prints the address, and stops every node it started on
Ctrl-C or SIGTERM. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (set here, and needed in
the environment of every driver that joins) Ray keeps its listeners on loopback.
A scaling sweep then runs its points concurrently, one Ray Train job per point:

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 make sweep SWEEP=micro_grid \\
        ARGS='hydra/launcher=joblib hydra.launcher.n_jobs=2 ray.address=<address> ray.cpus_per_worker=1'
"""

from __future__ import annotations

import argparse
import os
import signal
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="nodes in all, the head included")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each node offers")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.cpus < 1:
        parser.error("--nodes and --cpus must be >= 1")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    node = {"num_cpus": args.cpus, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        print(f"Ray cluster of {args.nodes} nodes x {args.cpus} CPUs at {cluster.address}", flush=True)
        print(f"  ray.address={cluster.address}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        cluster.shutdown()
        print("Ray cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
