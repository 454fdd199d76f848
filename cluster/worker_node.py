"""`ray start` for a worker node of the local cluster (`fragile cluster up --workers N`), run as
``python -m cluster.worker_node start --address=127.0.0.1:PORT ...``.

The head of a loopback cluster listens on 127.0.0.1 only. A worker node joining it needs Ray's multi-node mode,
and in that mode `ray start` rewrites a loopback bootstrap address ("127.0.0.1", "localhost") into the machine's
network address, where nothing of the head listens. On one machine the loopback address is the right one, so
this entry point keeps bootstrap addresses as given and is otherwise Ray's own `ray` command.
"""
from __future__ import annotations

import sys

import ray._private.services as services
from ray.scripts.scripts import main

services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    sys.exit(main())
