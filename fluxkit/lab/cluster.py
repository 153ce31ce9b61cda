"""Sweeps and validations on a Ray cluster: each variant (or placement) one Ray task on one GPU, or on CPUs.

A task runs its work as the serial path does, in a fresh process of its own (`fluxkit.lab.fresh`) on the node Ray
picked, so its memory, compile cache and stalls are its own and its time limit is the serial one. Ray restarts a
task whose worker was lost (a node that died, a process killed) once; a variant that fails or runs out of time keeps
its row with the reason, as in the serial sweep. Rows stream back as tasks finish. The driver receives each task's
images (PNG bytes) and reports (a tar archive), so a node needs no file system in common with the driver, only the
checkpoint at the same path (on shared storage, or built there with `fluxkit synth`).

`address`: `local` starts a cluster of this machine's GPUs (or CPUs) in this process; `auto` joins the cluster
running on this machine (`ray start --head`); any other value is a Ray address to join (`HOST:6379`,
`ray://HOST:10001`).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import socket
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checks import require_extra
from ..errors import FluxkitError, InputError, one_line

log = logging.getLogger(__name__)

# Ray's object store holds only rows, images and reports here: a small one leaves the memory to the models.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


def import_ray():
    require_extra("--ray", "ray", "ray")
    import ray

    return ray


def connect(address: str) -> bool:
    """Join or start the cluster; True when it was started here (and is stopped by `disconnect`)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        return True
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise InputError(f"--ray {address}: no Ray cluster to join there ({one_line(err)}); start one with "
                         "`ray start --head`, or use --ray with no address for a local one") from None
    return False


def task_resources(device: str, cluster_gpus: float) -> dict:
    """What one task asks Ray for: one GPU where the work runs on one (`cuda`, or `auto` on a cluster with GPUs),
    else one CPU. Read from the cluster, not from this process: the driver may run on a node without a GPU (a
    cluster's head) and still send its variants to the GPU nodes."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device} with --ray: Ray gives each task a GPU of its own, which the task sees as "
                         "cuda:0; use --device cuda (or auto)")
    if device == "cuda" and not cluster_gpus:
        raise InputError("--device cuda with --ray: the Ray cluster has no GPU; join nodes that have one (`ray start "
                         "--address=HEAD:6379` on each), or use --device cpu")
    return {"num_gpus": 1} if cluster_gpus and device != "cpu" else {"num_cpus": 1}


def _resources(device: str) -> dict:
    return task_resources(device, import_ray().cluster_resources().get("GPU", 0))


def _where() -> dict:
    ray = import_ray()
    context = ray.get_runtime_context()
    return {"node": socket.gethostname(), "node_id": context.get_node_id(), "gpu_ids": [str(g) for g in
                                                                                        ray.get_gpu_ids()]}


def _attempt(scratch: Path) -> int:
    """This task's attempt on this node: Ray reruns a task whose worker was lost, in a new worker."""
    scratch.mkdir(parents=True, exist_ok=True)
    marker = scratch / ".attempts"
    attempt = int(marker.read_text()) + 1 if marker.is_file() else 1
    marker.write_text(str(attempt))
    return attempt


def _variant_task(run_id: str, model: str, device: str, variant: dict, prompts: list[dict], iterations: int,
                  timeout_s: float, threads: int | None) -> tuple[dict, dict[str, bytes]]:
    """On a worker: one variant measured in a fresh process; its row (with where it ran) and its images."""
    from .fresh import reason
    from .sweep import Variant, measure_in_fresh_process, skipped_row

    v = Variant(**variant)
    scratch = Path(tempfile.gettempdir()) / f"fluxkit-ray-{run_id}" / v.name.replace("@", "_")
    where = {**_where(), "attempt": _attempt(scratch)}
    try:
        row = measure_in_fresh_process(model, device, v, iterations, scratch, prompts, timeout_s, threads)
    except (FluxkitError, RuntimeError) as err:
        return {**skipped_row(v, reason(err)), "ran_on": where}, {}
    images = {p.name: p.read_bytes() for p in scratch.glob("*.png")}
    return {**row, "ran_on": where}, images


@contextmanager
def _joined(address: str) -> Iterator:
    """Ray, joined (or started here, and then stopped at the end) at `address`."""
    ray = import_ray()
    started = connect(address)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _as_they_finish(ray, function, resources: dict,
                    arguments: list[tuple]) -> Iterator[tuple[int, object, str | None]]:
    """`function(*a)` for each `a` of `arguments`, each one Ray task in a worker of its own, run again once when its
    worker is lost: (index, result, None) as each finishes, or (index, None, why) for one whose worker was lost twice."""
    task = ray.remote(max_retries=1, retry_exceptions=False, max_calls=1, **resources)(function)
    pending = {task.remote(*a): i for i, a in enumerate(arguments)}
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done)
        try:
            result, lost = ray.get(done), None
        except ray.exceptions.RayError as err:
            result, lost = None, f"{type(err).__name__}: {one_line(err)[:500]}"
        yield i, result, lost


def sweep_on_ray(address: str, model: str, device: str, variant_list: list, compiled: tuple[bool, ...],
                 prompts: list[dict], iterations: int, work: Path, timeout_s: float, keep) -> list[dict]:
    """Every variant as one Ray task (compiled and/or eager where the tasks get GPUs); `keep(row)` as each finishes;
    the rows in the variants' order, each row's images in `work`."""
    from .sweep import compile_axis, image_dir, skipped_row

    with _joined(address) as ray:
        resources = _resources(device)
        gpu = "num_gpus" in resources
        if gpu:
            variant_list = compile_axis(variant_list, compiled)
        run_id = uuid.uuid4().hex[:12]
        # A CPU variant's images are bit for bit the serial sweep's only at its thread count; a GPU variant's process
        # keeps its node's, as the serial sweep's fresh processes do.
        threads = None if gpu else torch.get_num_threads()
        arguments = [(run_id, model, device, dataclasses.asdict(v), prompts, iterations, timeout_s, threads)
                     for v in variant_list]
        rows = {}
        for i, result, lost in _as_they_finish(ray, _variant_task, resources, arguments):
            v = variant_list[i]
            row, images = result if lost is None else (skipped_row(v, lost), {})  # lost twice: kept, with the reason
            if "skipped" not in row:
                row["images"] = image_dir(work, v)
                row["images"].mkdir(parents=True, exist_ok=True)
                for name, data in images.items():
                    (row["images"] / name).write_bytes(data)
            keep(row)
            rows[i] = row
        return [rows[i] for i in range(len(variant_list))]


def _validate_task(kwargs: dict) -> dict:
    """On a worker: one `fluxkit validate` run into a scratch folder; its report as a tar archive, or why it did not
    run (its inputs are checked here, where its device is: the driver may have no GPU)."""
    import shutil

    from .validate import validate

    out_root = Path(tempfile.mkdtemp(prefix="fluxkit-ray-validate-"))
    try:
        out_dir, code = validate(**kwargs, out_root=out_root, progress=False)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            tar.add(out_dir, arcname=out_dir.name)
        return {"name": out_dir.name, "code": code, "archive": archive.getvalue(), "ran_on": _where()}
    except FluxkitError as err:
        return {"error": one_line(err), "ran_on": _where()}
    finally:  # the report travels in the archive; the worker's node keeps nothing
        shutil.rmtree(out_root, ignore_errors=True)


def validate_on_ray(address: str, runs: list[dict], out_root: Path) -> list[tuple[Path | None, int]]:
    """One `validate` per keyword set of `runs`, each a Ray task; each report unpacked into `out_root` as it arrives,
    replacing an earlier report of the same name as a whole. A run that could not start is logged with its reason and
    given as (None, 2); the others go on."""
    from .validate import _move_into_place

    with _joined(address) as ray:
        out_root.mkdir(parents=True, exist_ok=True)
        results = {}
        for i, result, lost in _as_they_finish(ray, _validate_task, _resources(runs[0].get("device", "auto")),
                                               [(kwargs,) for kwargs in runs]):
            if lost is not None:
                result = {"error": lost, "ran_on": {"node": "a lost worker"}}
            if "error" in result:
                log.error("validate --placement %s did not run (on %s): %s", runs[i].get("placement"),
                          result["ran_on"]["node"], result["error"])
                results[i] = (None, 2)
                continue
            unpacked = Path(tempfile.mkdtemp(prefix=f".{result['name']}.", dir=out_root))
            with tarfile.open(fileobj=io.BytesIO(result["archive"]), mode="r:gz") as tar:
                tar.extractall(unpacked, filter="data")
            _move_into_place(unpacked / result["name"], out_root / result["name"])
            unpacked.rmdir()
            log.info("report %s came from %s", result["name"], result["ran_on"])
            results[i] = (out_root / result["name"], result["code"])
        return [results[i] for i in range(len(runs))]
