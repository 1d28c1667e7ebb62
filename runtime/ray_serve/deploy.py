"""Bringing a cluster up: connect to Ray (or start it), deploy the replicas, start the edge.

`start` joins the cluster at ``[serve.ray] address`` or starts a local one with this machine's
CPUs, creates the repository log (`repository.RepositoryLog`), deploys ``replicas`` replicas of
`replica.WaraReplica` with the adapter-affinity router, and starts the single server's gRPC
edge (`runtime.server.Server`) over a `cluster.Cluster`. Stopping the edge deletes the
application and ends what this process began of Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from runtime.config import BaseEntry, ServeConfig
from wara_train.basespec import parse_source
from wara_train.errors import ConfigError, WaraError

from .cluster import Cluster
from .replica import WaraReplica
from .repository import RepositoryLog, actor_name
from .router import AdapterAffinityRouter

log = logging.getLogger("wara.serve")
NAMESPACE = "wara"
DEPLOYMENT = "wara-replica"


def portable(config: ServeConfig) -> ServeConfig:
    """``config`` as a replica on another node or working directory reads it: the adapter root
    and hf: model directories as absolute paths, and no TLS files (the edge terminates TLS)."""
    bases = []
    for entry in config.bases:
        kind, target, task = parse_source(entry.source)
        if kind == "hf" and not os.path.isabs(target):
            source = "hf:" + str(Path(target).resolve()) + (f"@{task}" if task else "")
            entry = BaseEntry(entry.name, source, entry.task)
        bases.append(entry)
    root = str(Path(config.adapter_root).resolve()) if config.adapter_root else None
    return dataclasses.replace(config, bases=tuple(bases), adapter_root=root, tls_cert=None, tls_key=None,
                               tls_client_ca=None)


def _connect(config: ServeConfig) -> str:
    """Join the configured cluster or start a local one. Returns what this process did: "local"
    (started a cluster: it ends with this process), "joined" (connected to one: only the
    connection ends), or "caller" (Ray was initialised already, by the caller: left alone)."""
    settings = config.ray
    if ray.is_initialized():
        return "caller"
    if settings.address is not None:
        ray.init(address=settings.address, namespace=NAMESPACE)
        return "joined"
    ray.init(num_cpus=settings.num_cpus or os.cpu_count(), namespace=NAMESPACE, include_dashboard=False)
    return "local"


def _disconnect(connection: str) -> None:
    if connection == "local":
        serve.shutdown()
    if connection in ("local", "joined"):
        ray.shutdown()


def _check_resources(config: ServeConfig) -> None:
    settings = config.ray
    need = {"CPU": settings.replicas * settings.replica_cpus, "GPU": settings.replicas * settings.replica_gpus}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0)}
    if short:
        what = ", ".join(f"{need:g} {k} (the cluster has {has:g})" for k, (need, has) in short.items())
        message = (f"{settings.replicas} replicas of {settings.replica_cpus:g} CPUs and {settings.replica_gpus:g} GPUs "
                   f"need {what}; lower ray replicas or replica_cpus/replica_gpus")
        if settings.address is None:
            raise ConfigError(message + ", or raise ray num_cpus")
        log.warning("%s (waiting for the cluster to grow)", message)


def _why(app_name: str) -> str:
    """The last line of the error that stopped the replicas from starting (Ray's deployment
    status carries the constructor's traceback; its controller log has all of it)."""
    try:
        message = serve.status().applications[app_name].deployments[DEPLOYMENT].message
    except Exception:
        return ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def deployment(config: ServeConfig):
    """The replicas' Ray Serve deployment for ``config``."""
    settings = config.ray
    return serve.deployment(WaraReplica).options(
        name=DEPLOYMENT,
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=max(1.0, config.grace_s),
        logging_config={"enable_access_log": False},  # no log line per request
    )


def start(config: ServeConfig):
    from runtime.server import Server

    settings = config.ray
    connection = _connect(config)
    repository = None
    deployed = False
    try:
        _check_resources(config)
        serve.start(proxy_location="Disabled")  # the edge is this process's gRPC server, not Ray's proxies
        name = actor_name(settings.app_name)
        try:
            repository = ray.remote(RepositoryLog).options(name=name, namespace=NAMESPACE, num_cpus=0).remote()
        except ValueError:
            raise ConfigError(f"a wara application named {settings.app_name!r} is already served on this Ray cluster "
                              "(another `wara serve --ray`); give this one another ray app_name") from None
        log.info("deploying %d replicas on Ray (%s)", settings.replicas, settings.address or "local cluster")
        app = deployment(config).bind(portable(config), name, NAMESPACE)
        deployed = True
        try:
            handle = serve.run(app, name=settings.app_name, route_prefix=None)
        except RuntimeError as e:
            raise WaraError(f"the Ray Serve application did not start: {_why(settings.app_name) or e}") from None
        status = handle.status.remote().result(timeout_s=120)
        cluster = Cluster(config, handle, repository, status, functools.partial(_disconnect, connection))
    except BaseException:
        if deployed:  # never another edge's application of the same name
            try:
                serve.delete(settings.app_name)
            except Exception:
                pass
        if repository is not None:
            try:
                ray.kill(repository)
            except Exception:
                pass
        _disconnect(connection)
        raise
    server = Server(cluster)
    try:
        port = server.start()
    except BaseException:
        cluster.drain()
        raise
    return server, port
