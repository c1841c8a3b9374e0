"""One Ray worker node on 127.0.0.1, joining the cluster at `--address`, until it is killed (test helper).

What `ray start --address A --block` does, with every server of the node bound to 127.0.0.1: `ray start`
refuses to add a worker node while Ray's cluster mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and
with it on Ray binds the node's servers to the host's network address instead of 127.0.0.1. So the node
is started the way Ray's own multi-node test clusters (`ray.cluster_utils.Cluster`, the fake autoscaler's
nodes) start theirs: a `ray._private.node.Node` of its own, a raylet, object store and agents like any
other node. Prints `node_id=<hex>` once it is up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ray._private.node import Node
from ray._private.parameter import RayParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--num-cpus", type=float, required=True)
    parser.add_argument("--resources", default="{}")
    args = parser.parse_args()
    params = RayParams(node_ip_address="127.0.0.1", gcs_address=args.address, num_cpus=args.num_cpus,
                       resources=json.loads(args.resources), min_worker_port=0, max_worker_port=0,
                       dashboard_agent_listen_port=0)
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"node_id={node.node_id}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exiting stops the node's processes (atexit)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
