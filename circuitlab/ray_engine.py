"""The Ray engine of ``circuitlab.batch``: actors that each load the model once and pull
prompts from the driver's queue; dead actors are replaced. Ray is imported only here,
and only when a batch runs on it."""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import TYPE_CHECKING

from .errors import CircuitlabError
from .replacement import ReplacementModel
from .tracing import Outcome, Tracer, failure, worker_name

if TYPE_CHECKING:
    from .batch import Book

#: CPUs of a Ray cluster per default worker (without GPUs).
CPUS_PER_WORKER = 4
#: Seconds to wait for a cluster's address to accept a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for it to answer the HTTP/2 handshake.
ANSWER_TIMEOUT = 10.0
#: HTTP/2's client preface and an empty SETTINGS frame: a Ray cluster (a gRPC server)
#: answers with a SETTINGS frame of its own.
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
CLUSTER_HELP = ("start one with `ray start --head` on one machine (and `ray start "
                "--address=HEAD:6379` on the others), or leave out the address to run Ray on "
                "this machine")


class Worker:
    """The body of a Ray actor: a ``Tracer``, or the error that kept it from loading.
    ``model`` comes apart from the other ``Tracer`` arguments so that Ray can pass a
    ``ReplacementModel`` stored once in its object store."""

    def __init__(self, model, tracer_args: dict):
        try:
            self.tracer, self.error = Tracer(model, **tracer_args), None
        except Exception as err:  # noqa: BLE001 (reported by ready())
            self.tracer, self.error = None, f"{type(err).__name__}: {err}"

    def ready(self) -> dict:
        """``{"worker": host:pid, "error": why the model could not be loaded, or None}``."""
        return {"worker": worker_name(), "error": self.error}

    def trace(self, item: dict) -> Outcome:
        """See ``Tracer.trace``."""
        return self.tracer.trace(item)


def import_ray():
    """The ``ray`` module, or a ``CircuitlabError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise CircuitlabError('engine="ray" needs Ray, which is not installed here: pip install '
                              '"circuitlab[ray]", or pass engine="local" (the CLI: --engine local) '
                              "to trace in this process.") from None
    return ray


def check_reachable(address: str) -> None:
    """Raise a ``CircuitlabError`` unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a
    connection and answers gRPC's HTTP/2 handshake as a Ray cluster does, within seconds
    (Ray itself would wait minutes for an unreachable cluster, and forever for a server
    that is not Ray)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise CircuitlabError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379).")
    try:
        conn = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT)
    except OSError as err:
        raise CircuitlabError(f"No Ray cluster answers at {address} ({err}); {CLUSTER_HELP}.") from None
    with conn:
        why = not_grpc(conn)
    if why:
        raise CircuitlabError(f"{address} accepts connections but does not answer as a Ray "
                              f"cluster ({why}); check the address (the head's port, 6379 by "
                              f"default), or {CLUSTER_HELP}.")


def not_grpc(conn: socket.socket) -> str | None:
    """Why the server at the other end of ``conn`` is not a gRPC server (which answers
    HTTP/2's client preface with a SETTINGS frame), or ``None`` when it is one."""
    conn.settimeout(ANSWER_TIMEOUT)
    head = b""
    try:
        conn.sendall(HTTP2_HELLO)
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return "it closed the connection without an HTTP/2 answer"
            head += chunk
    except TimeoutError:
        return f"no answer to an HTTP/2 handshake in {ANSWER_TIMEOUT:g} s"
    except OSError as err:
        return str(err)
    settings = head[3] == 4 and head[5:] == bytes(4)  # frame type SETTINGS, stream 0
    return None if settings else f"it answered {head!r}, not an HTTP/2 SETTINGS frame"


def connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address``, or start Ray on this machine; whether we started
    it. A runtime already initialized in this process is used as it is."""
    if address not in (None, "auto"):
        check_reachable(address)
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError) as err:
        raise CircuitlabError(f"Cannot join the Ray cluster at {address} ({err}); "
                              f"{CLUSTER_HELP}.") from None
    return False


def worker_resources(ray, workers: int | None, gpus_per_worker: float, n_items: int) -> tuple:
    """``(workers, cpus per worker)`` for the cluster Ray is connected to."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
    if gpus_per_worker > 0:
        if gpus < gpus_per_worker:
            raise CircuitlabError(f"gpus_per_worker={gpus_per_worker} but the Ray cluster has "
                                  f"{gpus:g} GPUs; pass gpus_per_worker=0 to trace on CPUs.")
        workers = workers or int(gpus // gpus_per_worker)
        if workers * gpus_per_worker > gpus:
            raise CircuitlabError(f"{workers} workers x {gpus_per_worker} GPUs do not fit in the "
                                  f"cluster's {gpus:g} GPUs; pass fewer workers.")
    workers = min(workers or max(1, int(cpus // CPUS_PER_WORKER)), n_items)
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=cpus)
    share = math.floor(min(cpus / workers, largest) * 1e4) / 1e4  # Ray counts 1e-4 CPUs
    return workers, max(share, 1e-4)


def run_ray(book: Book, tracer_args: dict, address: str | None, workers: int | None,
            gpus_per_worker: float) -> None:
    """Trace ``book``'s queue on Ray actors, one loaded model each, each pulling the next
    prompt when it is free; a dead actor is replaced and its prompt queued again."""
    ray = import_ray()
    started = connect(ray, address)
    names = {}  # actor -> its worker name, for every actor started here
    try:
        n, cpus = worker_resources(ray, workers, gpus_per_worker, len(book.todo))
        tracer_args = {**tracer_args, "threads": max(1, int(cpus))}
        model = tracer_args.pop("model")
        if isinstance(model, ReplacementModel):
            model = ray.put(model)
        actor_class = ray.remote(Worker).options(num_cpus=cpus, num_gpus=gpus_per_worker,
                                                 scheduling_strategy="SPREAD")

        def start(count: int) -> list:
            """``count`` new actors, once their models are loaded."""
            new = [actor_class.remote(model, tracer_args) for _ in range(count)]
            names.update(dict.fromkeys(new, "?"))
            try:
                answers = ray.get([actor.ready.remote() for actor in new])
            except ray.exceptions.RayActorError as err:
                raise CircuitlabError(f"A Ray worker died while loading the model "
                                      f"({str(err).splitlines()[0]}); check its memory.") from None
            names.update((actor, a["worker"]) for actor, a in zip(new, answers))
            errors = [a["error"] for a in answers if a["error"]]
            if errors:
                raise CircuitlabError(f"A Ray worker could not load the model: {errors[0]}")
            return new

        idle, pending = start(n), {}
        book.started()
        while book.todo or pending:
            while idle and book.todo:
                actor, item = idle.pop(), book.todo.popleft()
                pending[actor.trace.remote(item)] = (actor, item)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, item = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                error = f"the worker died: {str(err).splitlines()[0]}"
                outcome = Outcome(failure(error, worker=names[actor]), retry=True)
                ray.kill(actor)
                (actor,) = start(1)
            book.record(item, outcome)
            idle.append(actor)
    finally:
        for actor in names:
            ray.kill(actor)
        if started:
            ray.shutdown()
