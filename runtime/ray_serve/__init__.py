"""Scale-out on Ray Serve: many serving cores behind one KServe-v2 endpoint, routed by adapter.

Each replica of a Ray Serve deployment (`replica.WaraReplica`) is a whole `runtime.service.Service`
(engine, adapter tiers, batcher), so heterogeneous batching stays inside a replica. This process
runs the single server's gRPC edge (`runtime.server`: protocol, auth, TLS, admission, health,
drain) over `cluster.Cluster`, a second implementation of the serving core's contract
(`runtime.core.ServingCore`) that answers through a Ray Serve deployment handle:

* inference goes to one replica, chosen by Ray Serve's model multiplexing with the adapter's name
  as the multiplexed model id (`router.AdapterAffinityRouter`: the replica that holds the adapter,
  else the one its name hashes to); a replica that does not hold it loads it through the
  service's lazy path from the shared adapter root. A request whose replica stops before it
  answers is sent once more, to another replica;
* repository loads and unloads are ops of one ordered log (`repository.RepositoryLog`, a Ray
  actor), broadcast to every replica and replayed by a replica that Ray starts later, so an
  unload is NOT_FOUND on every replica, a replaced one included;
* readiness is every replica ready and up to date with the log; metrics of every replica reach
  one Prometheus endpoint, each series labelled with its ``replica``.

Ray is optional (the ``ray`` extra): nothing here imports it before `start_cluster` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wara_train.errors import ConfigError

if TYPE_CHECKING:
    from runtime.config import ServeConfig
    from runtime.server import Server

EXTRA = "pip install 'wara-serve[ray]'"


def require_ray() -> None:
    """ConfigError naming the extra when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"serving on Ray needs Ray Serve, which is not installed ({e}): {EXTRA} "
                          "(the ray extra), or serve without --ray / [serve.ray]") from None


def start_cluster(config: "ServeConfig") -> "tuple[Server, int]":
    """Start (or join) a Ray cluster, deploy ``config.ray.replicas`` replicas and start the gRPC
    edge over them. Returns (server, bound port), as `runtime.server.create_server` does;
    ``server.stop()`` drains the edge and deletes the application."""
    require_ray()
    from .deploy import start

    return start(config)
