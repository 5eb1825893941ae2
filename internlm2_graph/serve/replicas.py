"""`internlm2-graph serve FOLDER --replicas N`: one og.Engine per GPU (or CPU slot) on Ray Serve.

og 0.18 runs a model on one GPU (docs/multi-gpu.md says why), so several GPUs serve as replicas:
each Ray Serve replica is a process with its own EngineBackend and the same routes as a single
server (`create_app`), on the GPU Ray gives it (`num_gpus`, fractional to share a card; Ray sets
CUDA_VISIBLE_DEVICES per replica). The command's own HTTP server, the front door, forwards each
request through a Ray DeploymentHandle, whose router (power of two choices: the less busy of two
replicas) picks the replica, and streams the replica's ASGI messages back. The front door is ours
rather than Ray's HTTP proxy so that a request whose replica dies mid-reply still gets OpenAI's
error body (Ray's proxy answers that with a bare 500 or a cut stream).

Ray is imported only here, inside functions: `import internlm2_graph.serve...` never loads it.
Needs the `cluster` extra (ray[serve]).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from internlm2_graph.errors import InternLM2GraphError

APP_PREFIX = "internlm2-graph-"  # + the model name: one app per model on a shared cluster
DEPLOYMENT = "engine"
REPLICA_HEADER = "x-replica"  # which replica answered: Ray's replica id (its actor's name ends so)
# A local Ray started by the command listens on loopback only: Ray resolves 127.0.0.1 to the
# host's address unless told that this is not a cluster (a multi-host cluster is `--address`).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# ----- where the replicas go -----


@dataclass(frozen=True)
class Placement:
    replicas: int
    num_gpus: float  # per replica; 0 for a CPU folder
    num_cpus: float  # per replica
    devices: str | None = None  # CUDA_VISIBLE_DEVICES of a local Ray


def placement(
    cuda: bool,
    replicas: int | None = None,
    devices: list[int] | None = None,
    gpus_per_replica: float | None = None,
    address: str | None = None,
) -> Placement:
    """Replicas and their resources from the command's flags (checked: a refusal says the fix)."""
    if not cuda:
        if devices or gpus_per_replica:
            raise InternLM2GraphError(
                "--devices and --gpus-per-replica place replicas on GPUs, and this folder was "
                "built for the CPU: use --replicas N (or build with -e cuda)"
            )
        return Placement(replicas or 1, 0.0, 1.0)
    if devices and address:
        raise InternLM2GraphError(
            "--devices names this host's GPUs, and with --address Ray places replicas on the "
            "cluster's GPUs: use --replicas N (and --gpus-per-replica) instead"
        )
    if devices and len(set(devices)) != len(devices):
        raise InternLM2GraphError(f"--devices names a GPU twice: {devices}")
    count = replicas or (len(devices) if devices else 1)
    if devices and count < len(devices):
        raise InternLM2GraphError(
            f"{count} replica(s) on {len(devices)} GPUs would give a replica several GPUs, "
            "and og 0.18 runs a model on one GPU: ask for at least one replica per GPU"
        )
    # A fractional replica must fit on one card (Ray does not split it over two), so the
    # default share is what packs: 3 replicas on 2 GPUs take half a GPU each, not two thirds.
    share = gpus_per_replica or (1 / math.ceil(count / len(devices)) if devices else 1.0)
    if devices and count > len(devices) * math.floor(1 / share + 1e-9):
        raise InternLM2GraphError(
            f"{count} replicas of {share:g} GPU do not fit on the {len(devices)} GPU(s) of "
            "--devices (a replica stays on one GPU): lower --replicas or --gpus-per-replica"
        )
    visible = ",".join(str(d) for d in devices) if devices else None
    return Placement(count, share, 1.0, visible)


# ----- one replica: the single server's routes on its own engine -----


class Replica:
    """A Ray Serve replica: EngineBackend + create_app, called with whole HTTP requests."""

    def __init__(self, model_dir: str, model_name: str, backend: dict):
        from internlm2_graph.serve.app import create_app
        from internlm2_graph.serve.engine import EngineBackend

        self.backend = EngineBackend(model_dir, **backend)
        self.app = create_app(self.backend, model_name)
        self.id = _replica_id()
        self._tasks: set[asyncio.Task] = set()

    async def http(self, request: dict):
        """The app's ASGI messages for one request, in batches of what is ready (a generator:
        the front door asks with stream=True). Closing it early tells the app the client left,
        which cancels the turn in the engine."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request["body"], "more_body": False}]

        async def receive():
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.id.encode())]
                message = {**message, "headers": headers}
            messages.put_nowait(message)

        task = asyncio.ensure_future(self.app(_scope(request), receive, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            while True:
                getter = asyncio.ensure_future(messages.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                batch = [getter.result()] if getter.done() and not getter.cancelled() else []
                while not messages.empty():
                    batch.append(messages.get_nowait())
                if batch:
                    yield batch
                if task.done() and messages.empty():
                    task.result()
                    return
        finally:
            gone.set()  # a no-op once the app finished; else the app cancels its turn

    def __del__(self):
        # Ray Serve calls this when it stops the replica, after in-flight requests drained.
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def _replica_id() -> str:
    with contextlib.suppress(Exception):  # outside Ray Serve (a unit test): the pid
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    return str(os.getpid())


def _scope(request: dict) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "query_string": request["query_string"],
        "root_path": "",
        "headers": request["headers"],
        "client": None,
        "server": None,
    }


# ----- the front door: HTTP in, a replica's messages out, OpenAI's error when it dies -----


class FrontDoor:
    """An ASGI app forwarding every HTTP request to a replica through `handle`.

    Replies other than event streams are held until complete, so a replica that dies mid-reply
    leaves the client a whole OpenAI error (502) instead of half a body; an event stream that
    was started ends with an error event and [DONE], as a single server's failed stream does.
    """

    def __init__(self, handle):
        self.handle = handle.options(stream=True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return  # lifespan: nothing to start; the replicas belong to Ray Serve
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b""),
            "headers": list(scope.get("headers", [])),
            "body": body,
        }
        replies = self.handle.http.remote(request)
        watcher = asyncio.ensure_future(_disconnect(receive))
        try:
            await _relay(replies, watcher, send)
        finally:
            watcher.cancel()


async def _relay(replies, watcher: asyncio.Future, send) -> None:
    held: list[dict] = []  # a reply that is not an event stream, until it is complete
    streaming, sent, complete = False, False, False
    try:
        while not complete:
            step = asyncio.ensure_future(replies.__anext__())
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():  # the client left: stop the replica's work
                step.add_done_callback(_quiet)
                step.cancel()
                replies.cancel()
                return
            try:
                batch = step.result()
            except StopAsyncIteration:
                break
            for message in batch:
                if message["type"] == "http.response.start":
                    streaming = _is_event_stream(message)
                elif message["type"] == "http.response.body":
                    complete = not message.get("more_body", False)
                if streaming:
                    await send(message)
                    sent = True
                else:
                    held.append(message)
        for message in held:
            await send(message)
    except Exception as err:  # the replica died (RayActorError...) or Ray failed the call
        error = _replica_error(err)
        if not sent:
            payload = json.dumps(error).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 502,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        events = f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        await send({"type": "http.response.body", "body": events})


def _replica_error(err: Exception) -> dict:
    from internlm2_graph.serve.protocol import OpenAIError

    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    message = (
        f"the replica serving this request failed ({type(err).__name__}: {reason}); "
        "the other replicas keep serving and Ray replaces this one: retry the request"
    )
    return OpenAIError(502, message, code="replica_failed", kind="server_error").body()


def _quiet(task: asyncio.Future) -> None:
    """Retrieve a cancelled step's outcome (Ray's RequestCancelledError), which nobody reads."""
    if not task.cancelled():
        task.exception()


def _is_event_stream(start: dict) -> bool:
    headers = dict(start.get("headers", []))
    return headers.get(b"content-type", b"").startswith(b"text/event-stream")


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ----- the command -----


@dataclass(frozen=True)
class ServeOptions:
    model_dir: str
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    backend: dict = field(default_factory=dict)  # EngineBackend's keyword arguments
    max_ongoing_requests: int = 256
    address: str | None = None  # join this Ray cluster; None: start a local one

    @property
    def app_name(self) -> str:
        # Ray names a replica's actor app#deployment#id: keep separators out of the app's name
        return APP_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "-", self.model_name)


def deployment(options: ServeOptions, where: Placement):
    """The bound Ray Serve application: `where.replicas` replicas of Replica."""
    from ray import serve

    actor = {"num_cpus": where.num_cpus}
    if where.num_gpus:
        actor["num_gpus"] = where.num_gpus
    engine = serve.deployment(
        Replica,
        name=DEPLOYMENT,
        num_replicas=where.replicas,
        ray_actor_options=actor,
        max_ongoing_requests=options.max_ongoing_requests,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    model_dir = str(Path(options.model_dir).resolve())
    return engine.bind(model_dir, options.model_name, options.backend)


def start(options: ServeOptions, where: Placement):
    """Ray (local or joined) and the replicas, ready: (the DeploymentHandle, Ray's address)."""
    if options.address is None:
        os.environ.update(LOOPBACK_ENV)  # read when ray is first imported
    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not a line per request
    if options.address is None:
        if where.devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = where.devices
        cpus = max(os.cpu_count() or 1, int(where.replicas * where.num_cpus + 0.999))
        _start_local_ray(ray, cpus)
    else:
        ray.init(address=options.address, logging_level="WARNING")
    try:
        serve.start(http_options={"host": None})  # no Ray proxy: the front door is ours
        handle = serve.run(
            deployment(options, where), name=options.app_name, route_prefix=None, blocking=False
        )
    except BaseException:
        stop(options)
        raise
    return handle, ray.get_runtime_context().gcs_address


def _start_local_ray(ray, cpus: int, attempts: int = 2) -> None:
    """ray.init of a one-host Ray. Ray gives its raylet a fixed 30 s to register, which a busy
    host can miss: one more try, then a one-line error."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
            return
        except Exception as err:
            ray.shutdown()
            if attempt == attempts - 1:
                raise InternLM2GraphError(
                    f"the local Ray did not start ({err}): retry, or start one with "
                    "`ray start --head` and pass its address with --address"
                ) from None


def stop(options: ServeOptions) -> None:
    """Stop the replicas (Ray Serve drains them first); a local Ray goes too."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(options.app_name)
    if options.address is None:
        with contextlib.suppress(Exception):
            serve.shutdown()
    ray.shutdown()


def serve_replicas(options: ServeOptions, where: Placement) -> int:
    """Run until SIGINT/SIGTERM: then stop taking requests, finish those in flight, stop Ray."""
    import sys

    import uvicorn

    listener = _listen(options.host, options.port)  # before Ray, whose workers take ports
    try:
        handle, address = start(options, where)
    except BaseException:
        listener.close()
        raise
    try:
        kind = "joined" if options.address else "local"
        print(f"ray: {kind} cluster at {address}", file=sys.stderr)
        print(
            f"serving {options.model_dir} as {options.model_name!r} with {where.replicas} "
            f"replica(s) on http://{options.host}:{options.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            FrontDoor(handle),
            host=options.host,
            port=options.port,
            lifespan="off",
            log_level="warning",
        )
        _run_draining(uvicorn.Server(config), listener)
    finally:
        listener.close()
        stop(options)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise InternLM2GraphError(
            f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host"
        ) from None
    listener.listen(2048)
    return listener


def _run_draining(server, listener: socket.socket) -> None:
    """uvicorn's own shutdown drains: on a signal it stops listening and waits for the requests
    in flight. It then raises the signal again for the handler it found; that handler is a no-op
    here, so the command goes on to stop the replicas instead of dying mid-cleanup."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
