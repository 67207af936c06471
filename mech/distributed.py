"""Distributed sweeps over Ray: patch and ablation lists fanned out to actors that each hold a model replica.

:class:`RayPool` starts ``workers`` Ray actors (a local cluster when no address is given, or an existing
cluster at ``address``); each loads the model once from a :class:`ReplicaSpec` (a registry name, a local dir or
a ``.gguf``; ``device_map``/``max_memory`` shard one replica over a node's devices). :meth:`RayPool.map`
hands out units of work to idle actors and gathers the results in input order:

* every finished unit is written to the :class:`~mech.cache.DiskCache` at once (when one is given), so a
  re-run after a crash recomputes nothing that finished;
* a worker that dies mid-unit (process killed, node lost, out of memory) is replaced by a fresh actor and
  its unit is re-run; an exception raised by the work itself is not retried and surfaces as-is.

On top: :func:`distributed_sweep` (any of :mod:`mech.patching`'s sweeps, one unit per few pairs) and
:func:`refusal_scores` (:func:`mech.scoring.refusal_scores` of many interventions, a few per unit, e.g. the
random controls of :func:`mech.controls.cumulative_ablation`, which take it as their scorer). Both give the single-process result: each unit runs
the same library function on its share; rows computed in another batch composition or thread count can
differ in the last float32 bits (measured in ``tests/test_distributed.py``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mech import patching
from mech.cache import DiskCache, code_version, make_key
from mech.models import load_model
from mech.patching import PatchingError, PatchResult, as_pairs
from mech.refusal import RefusalIdsError, check_refusal_ids
from mech.scoring import BACKENDS, Backend
from mech.scoring import refusal_scores as local_scores

if TYPE_CHECKING:
    from torch import Tensor

    from mech.interventions import Intervention
    from mech.models import LoadedModel


class DistributedError(RuntimeError):
    """A Ray pool could not start, or its workers kept dying."""


@dataclass(frozen=True)
class ReplicaSpec:
    """How each worker loads its replica: the arguments of :func:`mech.models.load_model`."""

    name_or_path: str
    device: str = "cpu"
    dtype: str = "auto"
    quantize: str = "none"
    cache_dir: str | None = None
    device_map: str | dict | None = None
    max_memory: dict | None = None

    def load(self) -> LoadedModel:
        return load_model(**asdict(self))


# ------------------------------------------------------------------------------------------ worker tasks


def _task_sweep(lm: LoadedModel, sweep: str, pairs: list[tuple[str, str]], kwargs: dict[str, Any]) -> dict[str, Any]:
    sweeps: dict[str, Callable[..., PatchResult]] = {
        "patch_sweep": patching.patch_sweep, "layer_sweep": patching.layer_sweep,
        "head_sweep": patching.head_sweep, "neuron_sweep": patching.neuron_sweep}
    return sweeps[sweep](lm, pairs, **kwargs).to_dict()


def _task_scores(
    lm: LoadedModel, prompts: list[str], refusal_ids: list[int], interventions: list[Intervention | None],
    backend: Backend, batch_size: int,
) -> Tensor:
    return local_scores(lm, prompts, refusal_ids, interventions, backend, batch_size)


def _task_info(lm: LoadedModel) -> dict[str, Any]:
    import torch

    return {"pid": os.getpid(), "fingerprint": lm.fingerprint, "threads": torch.get_num_threads(),
            "name": lm.name}


TASKS: dict[str, Callable[..., Any]] = {"sweep": _task_sweep, "scores": _task_scores, "info": _task_info}


class _Worker:
    """The actor body (wrapped with ``ray.remote`` at pool start)."""

    def __init__(self, spec: dict[str, Any], threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.lm = ReplicaSpec(**spec).load()

    def run(self, task: str, payload: dict[str, Any]) -> Any:
        return TASKS[task](self.lm, **payload)


# ----------------------------------------------------------------------------------------- the address

RAY_INSTALL = "pip install 'mech[distributed]' (or pip install 'ray==2.60.0')"
RAY_CLIENT_INSTALL = "pip install 'mech[ray-client]' (or pip install 'ray[client]==2.60.0')"
RAY_CLIENT_PORT = 10001


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _client_installed() -> bool:
    """The Ray client (``ray://`` addresses) needs grpcio, which only the ``ray[client]`` extra installs."""
    return _installed("grpc")


def _auto_address() -> str:
    """The ``host:port`` that ``ray.init(address="auto")`` would join (``$RAY_ADDRESS``, the latest local
    cluster), or :class:`DistributedError` when there is none."""
    from ray._private import services

    try:
        found = services.get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found or found == "auto":
        raise DistributedError(
            "--ray-address auto: no running Ray cluster on this machine; start one with `ray start --head`, pass "
            "host:port or ray://host:10001 of a running cluster, or drop --ray-address to start a local one"
        )
    return found


def check_address(address: str, timeout: float = 3.0) -> str:
    """Check, within about ``timeout`` seconds and without joining, that the Ray cluster at ``address`` can be
    joined: Ray (and for ``ray://`` the Ray client) is installed, ``auto`` finds a running cluster, and the
    cluster's port accepts a TCP connection. Returns the ``host:port`` checked; raises a one-line
    :class:`DistributedError` saying what is wrong and how to fix it."""
    import socket

    a = str(address).strip()
    if not _installed("ray"):
        raise DistributedError(f"--ray-address {a!r} needs Ray, which is not installed: {RAY_INSTALL}")
    if a == "local":
        return a
    if a.startswith("ray://"):
        if not _client_installed():
            raise DistributedError(
                f"--ray-address {a!r} uses the Ray client, which is not installed (no grpcio): {RAY_CLIENT_INSTALL}"
            )
        hostport, default_port = a[len("ray://"):].rstrip("/"), RAY_CLIENT_PORT
    elif a == "auto":
        hostport, default_port = _auto_address(), None
    elif "://" in a:
        raise DistributedError(f"--ray-address {a!r}: unknown scheme; use auto, host:port or ray://host:port")
    else:
        hostport, default_port = a, None
    host, sep, port_s = hostport.rpartition(":")
    if not sep:
        host, port_s = hostport, ""
    host = host.strip("[]")
    if not port_s and default_port:
        port_s = str(default_port)
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise DistributedError(
            f"--ray-address {a!r} is not host:port; use auto, host:port (the head's GCS port, e.g. 6379) or "
            "ray://host:10001"
        )
    port = int(port_s)
    fix = ("start the cluster (`ray start --head` on that host), fix the address, or drop --ray-address to start "
           "a local cluster")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            speaks_grpc = _speaks_http2(sock)
    except OSError as e:
        why = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise DistributedError(f"--ray-address {a!r}: nothing accepts connections at {host}:{port} ({why}); {fix}") from None
    if not speaks_grpc:
        raise DistributedError(
            f"--ray-address {a!r}: {host}:{port} accepts connections but does not answer like a Ray cluster (no "
            "gRPC); point it at the head's GCS port (host:6379) or its client port (ray://host:10001)"
        )
    return f"{host}:{port}"


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _speaks_http2(sock: Any) -> bool:
    """Whether the peer answers the HTTP/2 client preface with a SETTINGS frame, as every gRPC server (Ray's GCS
    and its client server) does; an HTTP/1 proxy or another service does not."""
    try:
        sock.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == 0x04  # frame type SETTINGS


# ------------------------------------------------------------------------------------------------- pool


@dataclass
class PoolStats:
    units: int = 0
    computed: int = 0
    cached: int = 0
    retried: int = 0  # units re-run because their worker died
    restarts: int = 0  # workers replaced
    per_worker: dict[int, int] = field(default_factory=dict)


class RayPool:
    """``workers`` Ray actors, each holding one model replica; use as a context manager.

    ``address``: ``None`` starts a local Ray cluster (stopped on close); ``"auto"`` or ``"ray://host:port"``
    joins an existing one (the library is shipped to it as a ``py_modules`` runtime env). ``threads``: torch
    threads per worker (default: this machine's cores divided by ``workers``). ``cache``: where finished
    units are stored (a :class:`DiskCache`); ``max_restarts``: how many dead workers may be replaced.
    """

    def __init__(
        self,
        spec: ReplicaSpec,
        workers: int = 2,
        address: str | None = None,
        cache: DiskCache | None = None,
        threads: int | None = None,
        max_restarts: int = 4,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.spec, self.n_workers, self.address, self.cache = spec, workers, address, cache
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // workers)
        self.max_restarts = max_restarts
        self.stats = PoolStats()
        self._actors: list[Any] = []
        self._started_ray = False
        self._info: list[dict[str, Any]] = []

    # -- lifecycle
    def __enter__(self) -> RayPool:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise DistributedError(f"distributed sweeps need Ray: {RAY_INSTALL}") from e
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            if self.address:
                check_address(self.address)  # seconds, instead of ray.init's retries against a dead address
                kw["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parent)]}
                try:
                    ray.init(address=self.address, **kw)
                except Exception as e:
                    raise DistributedError(f"could not join the Ray cluster at {self.address!r}: {e}") from e
            else:
                # logical CPUs for scheduling only: each actor takes one, and its torch threads are set explicitly,
                # so several pools (or more workers than cores) never wait on each other for a CPU slot
                ray.init(num_cpus=max(64, 4 * self.n_workers), object_store_memory=256 * 2**20, **kw)
            self._started_ray = True
        self._remote = ray.remote(num_cpus=1)(_Worker)
        self._actors = [self._new_actor() for _ in range(self.n_workers)]
        self._info = ray.get([a.run.remote("info", {}) for a in self._actors])

    def _new_actor(self) -> Any:
        return self._remote.remote(asdict(self.spec), self.threads)

    def close(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    @property
    def fingerprint(self) -> str:
        """The model fingerprint the workers report (cache keys use it)."""
        return self._info[0]["fingerprint"] if self._info else self.spec.name_or_path

    def worker_pids(self) -> list[int]:
        return [i["pid"] for i in self._info]

    # -- work
    def map(
        self,
        task: str,
        payloads: Sequence[dict[str, Any]],
        cache_parts: Sequence[dict[str, Any]] | None = None,
        namespace: str = "ray-unit",
        modules: tuple[str, ...] | None = None,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Run ``TASKS[task](lm, **payload)`` for every payload on the workers; results in input order.

        With ``cache_parts`` (one dict per payload) and a pool cache, a unit whose key is stored is read
        instead of run, and every unit is stored the moment it finishes. ``on_result(i, result)`` is called
        as each unit arrives (progress; tests use it to kill a worker mid-sweep).
        """
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError
        from tqdm.auto import tqdm

        n = len(payloads)
        results: list[Any] = [None] * n
        done = [False] * n
        paths: list[Path | None] = [None] * n
        self.stats.units += n
        if self.cache is not None and cache_parts is not None:
            code = code_version(modules)
            for i, parts in enumerate(cache_parts):
                key = make_key(namespace=namespace, code=code, model=self.fingerprint, task=task, **parts)
                paths[i] = p = self.cache.path(namespace, key)
                if self.cache.enabled and p.exists():
                    try:
                        results[i], done[i] = self.cache.load(p, "json"), True
                        self.stats.cached += 1
                    except (OSError, ValueError):
                        p.unlink(missing_ok=True)
        pending = deque(i for i in range(n) if not done[i])
        idle = deque(range(len(self._actors)))
        inflight: dict[Any, tuple[int, int]] = {}
        bar = tqdm(total=len(pending), desc=f"ray {task}", disable=len(pending) < 4, leave=False)
        try:
            while pending or inflight:
                while pending and idle:
                    w, i = idle.popleft(), pending.popleft()
                    inflight[self._actors[w].run.remote(task, payloads[i])] = (i, w)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    i, w = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                    except (RayActorError, WorkerCrashedError):
                        self._replace(w)
                        pending.appendleft(i)
                        idle.append(w)
                        self.stats.retried += 1
                        continue
                    except ray.exceptions.RayTaskError as e:
                        raise e.as_instanceof_cause() from None
                    results[i], done[i] = res, True
                    self.stats.computed += 1
                    self.stats.per_worker[w] = self.stats.per_worker.get(w, 0) + 1
                    path = paths[i]
                    if path is not None and self.cache is not None:
                        self.cache.store(path, res, "json")
                    idle.append(w)
                    bar.update(1)
                    if on_result is not None:
                        on_result(i, res)
        finally:
            bar.close()
        return results

    def _replace(self, w: int) -> None:
        import ray

        if self.stats.restarts >= self.max_restarts:
            raise DistributedError(
                f"Ray workers died {self.stats.restarts + 1} times (limit max_restarts={self.max_restarts}); "
                "check their memory (each holds a model replica) and the cluster's logs")
        try:
            ray.kill(self._actors[w])
        except Exception:  # already gone
            pass
        self.stats.restarts += 1
        self._actors[w] = self._new_actor()
        self._info[w] = ray.get(self._actors[w].run.remote("info", {}))


# ---------------------------------------------------------------------------------------------- sweeps


def _chunks(seq: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), size):
        yield list(seq[i : i + size])


Sweep = Literal["patch_sweep", "layer_sweep", "head_sweep", "neuron_sweep"]


def distributed_sweep(
    pool: RayPool,
    sweep: Sweep,
    pairs: Sequence[tuple[str, str]],
    pairs_per_unit: int = 1,
    on_result: Callable[[int, Any], None] | None = None,
    **kwargs: Any,
) -> PatchResult:
    """``layer_sweep`` / ``head_sweep`` / ``neuron_sweep`` / ``patch_sweep`` over ``pairs``, split into units
    of ``pairs_per_unit`` pairs on the pool's workers; the :class:`~mech.patching.PatchResult` of all pairs.

    ``kwargs`` go to the sweep (``direction``, ``refusal_ids``, ``method``, ``components``...); they must be
    plain data (no callables), since they travel to the workers and into the cache key.
    """
    if sweep not in ("patch_sweep", "layer_sweep", "head_sweep", "neuron_sweep"):
        raise ValueError(f"unknown sweep {sweep!r}; use layer_sweep, head_sweep, neuron_sweep or patch_sweep")
    if isinstance(pairs_per_unit, bool) or not isinstance(pairs_per_unit, int) or pairs_per_unit < 1:
        raise ValueError(f"pairs_per_unit must be a positive integer, got {pairs_per_unit!r}")
    pairs = as_pairs(pairs)  # one line for two bare strings, a PromptSet, a bad tuple, before any worker runs
    if kwargs.get("refusal_ids") is not None:
        try:
            kwargs["refusal_ids"] = list(check_refusal_ids(kwargs["refusal_ids"]))  # the vocab is checked by the workers
        except RefusalIdsError as e:
            raise PatchingError(str(e)) from None
    units = list(_chunks(pairs, pairs_per_unit))
    payloads = [{"sweep": sweep, "pairs": u, "kwargs": kwargs} for u in units]
    parts = [{"sweep": sweep, "pairs": u, "kwargs": kwargs} for u in units]
    outs = pool.map("sweep", payloads, parts, namespace="ray-sweep",
                    modules=("hooks", "models", "refusal", "patching"), on_result=on_result)
    return merge_results([PatchResult.from_dict(o) for o in outs])


def merge_results(parts: Sequence[PatchResult]) -> PatchResult:
    """One :class:`~mech.patching.PatchResult` from per-unit results over disjoint pairs (same patches)."""
    first = parts[0]
    labels = first.labels
    for r in parts[1:]:
        if r.labels != labels or r.direction != first.direction:
            raise DistributedError("cannot merge sweeps over different patches or directions")
    meta = dict(first.meta)
    meta["pairs"] = [p for r in parts for p in r.meta.get("pairs", [])]
    meta["seconds"] = sum(r.meta.get("seconds", 0.0) for r in parts)
    meta["units"] = len(parts)
    return PatchResult(
        kind=first.kind, method=first.method, direction=first.direction, patches=list(first.patches),
        raw=np.concatenate([r.raw for r in parts]), clean=np.concatenate([r.clean for r in parts]),
        source=np.concatenate([r.source for r in parts]), meta=meta,
    )


def refusal_scores(
    pool: RayPool,
    prompts: Sequence[str],
    refusal_ids: Sequence[int],
    interventions: Sequence[Intervention | None],
    backend: Backend = "hooks",
    batch_size: int = 16,
    per_unit: int = 2,
) -> Tensor:
    """:func:`mech.scoring.refusal_scores` on the pool's workers: ``[n_interventions, n_prompts]``, in order, the
    interventions in units of ``per_unit``, each unit one call of it on a worker. The scorer
    :func:`mech.controls.cumulative_ablation` takes, bound with ``functools.partial(refusal_scores, pool)``. The
    interventions (an :class:`~mech.interventions.Ablate` with its means) travel to the workers pickled."""
    if isinstance(prompts, str):
        raise ValueError("prompts is one string; pass a list of prompt texts")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use hooks or batched")
    ids = check_refusal_ids(refusal_ids)  # the vocabulary is checked by the workers
    common = dict(prompts=list(prompts), refusal_ids=list(ids), backend=backend, batch_size=batch_size)
    units = list(_chunks(list(interventions), per_unit))
    outs = pool.map("scores", [dict(common, interventions=u) for u in units])
    return torch.cat(outs) if outs else torch.empty(0, len(prompts))
