"""Sweeps and validations on a Ray cluster (`--ray`): a local cluster with two workers on this machine's CPUs (and two
GPUs declared, which this process cannot use) runs the tiny checkpoint's sweep, each variant a task in a fresh
process, with the serial sweep's rows, and one `validate` report per placement."""
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from fluxkit.errors import InputError
from fluxkit.lab.cluster import task_resources, validate_on_ray
from fluxkit.lab.sweep import Variant, content_differences, sweep, variants
from helpers import FAST_VALIDATE, run_main

ray = pytest.importorskip("ray")

PROMPTS = [{"name": "cat", "prompt": "a cat on a red roof", "seed": 3}]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module, each sweep joins it: two workers (this machine's two CPUs) and two GPUs
    declared the way Ray's autoscaler declares a node's resources, which this process cannot use: a driver on a
    cluster's head node without a GPU."""
    from fluxkit.lab.cluster import connect

    os.environ["RAY_OVERRIDE_RESOURCES"] = '{"GPU": 2}'
    try:
        assert connect("local")
    finally:
        del os.environ["RAY_OVERRIDE_RESOURCES"]
    assert ray.cluster_resources().get("CPU", 0) >= 2 and ray.cluster_resources()["GPU"] == 2
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clip():
    from fluxkit.lab.metrics import load_clip

    return load_clip("ViT-B-32", "openai")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _fresh_processes() -> list[int]:
    """The fresh processes of this test's Ray workers: under this process (which started the local cluster), not
    directly (another test file's, on another pytest worker, must not be taken for one)."""
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if b"fluxkit.lab.fresh" not in Path(f"/proc/{pid}/cmdline").read_bytes() or _parent(pid) == os.getpid():
                continue
            ancestor = pid
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = _parent(ancestor)
            if ancestor == os.getpid():
                found.append(pid)
        except OSError:
            continue
    return found


def test_the_ray_sweep_gives_the_serial_rows_even_when_a_worker_is_lost(tiny_dir, cluster, clip, tmp_path):
    """Each variant a task in a fresh process; the worker of the first variant to start is killed while it measures:
    Ray runs that task again on a new worker, and the rows are still the serial sweep's."""
    chosen = variants(["nf4"], t5=(True,))
    partial = tmp_path / "rows.jsonl"
    result = {}
    thread = threading.Thread(target=lambda: result.update(sweep(
        str(tiny_dir), "cpu", chosen, clip, iterations=2, prompts=PROMPTS, partial=partial, ray="auto")))
    thread.start()
    deadline = time.monotonic() + 120
    while not _fresh_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = _fresh_processes()[0]
    worker = _parent(child)
    os.kill(worker, signal.SIGKILL)
    thread.join(timeout=300)
    serial = sweep(str(tiny_dir), "cpu", chosen, clip, iterations=2, prompts=PROMPTS)
    on_ray = result["rows"]
    assert [r["variant"] for r in on_ray] == [v.name for v in chosen]
    assert content_differences(on_ray, serial["rows"]) == []
    assert on_ray[1]["fidelity"] == serial["rows"][1]["fidelity"]  # the same images, bit for bit
    assert sorted(r["ran_on"]["attempt"] for r in on_ray) == [1, 2]  # the lost one ran once more, the other once
    assert all(r["ran_on"]["node"] and r["ran_on"]["node_id"] for r in on_ray)
    assert all(r["latency"]["n"] == 2 for r in on_ray)
    assert len(partial.read_text().splitlines()) == 2  # each row as its task finished, the lost attempt not among them


def test_variants_that_fail_or_run_out_of_time_keep_their_rows_and_go_to_the_clusters_gpus(tiny_dir, cluster, clip):
    """`auto` on a cluster with GPUs, from a process without one (a head node's): each variant asks for a GPU, its
    row names it, and the compile axis is the GPU sweep's; the tasks' CUDA is this machine's (none), so they run on
    its CPUs."""
    [raised] = sweep(str(tiny_dir), "auto", [Variant("torchao-fp8dq", True, "resident")], clip, iterations=1,
                     prompts=PROMPTS, compiled=(False,), ray="auto")["rows"]
    assert "compute capability 8.9" in raised["skipped"] and raised["variant"] == "torchao-fp8dq+eager@resident"
    assert raised["ran_on"]["gpu_ids"] in (["0"], ["1"])
    [stalled] = sweep(str(tiny_dir), "cpu", [Variant("nf4", True, "resident")], clip, iterations=1, prompts=PROMPTS,
                      variant_timeout_s=0.5, ray="auto")["rows"]
    assert "did not finish within 0.5 s" in stalled["skipped"] and stalled["variant"] == "nf4@resident"
    assert stalled["ran_on"]["gpu_ids"] == []  # a CPU sweep asks for none


def test_validate_on_ray_brings_back_each_report_and_goes_on_past_one_that_cannot_run(tiny_dir, cluster, tmp_path,
                                                                                      caplog):
    fast = {k: v for k, v in FAST_VALIDATE.items() if k != "progress"}
    runs = [dict(fast, model=str(tiny_dir), placement=p, name=f"tiny-{p}", iterations=1) for p in ("vortex", "resident")]
    with caplog.at_level(logging.ERROR, logger="fluxkit.lab.cluster"):
        reports = validate_on_ray("auto", runs, tmp_path / "reports")
    assert reports[0] == (None, 2)  # the tiny checkpoint has no references for vortex; checked on the worker
    assert "validate --placement vortex did not run" in caplog.text and "no reference images" in caplog.text
    assert reports[1] == (tmp_path / "reports" / "tiny-resident", 0)
    metrics = json.loads((reports[1][0] / "metrics.json").read_text())
    assert metrics["verdict"] == "pass" and set(metrics["notebooks"].values()) == {"ok"}
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["tiny-resident"]  # nothing else unpacked or left


def test_what_a_task_asks_ray_for():
    assert task_resources("auto", 2) == task_resources("cuda", 1) == {"num_gpus": 1}
    assert task_resources("auto", 0) == task_resources("cpu", 8) == {"num_cpus": 1}
    with pytest.raises(InputError, match="the Ray cluster has no GPU; join nodes that have one"):
        task_resources("cuda", 0)
    with pytest.raises(InputError, match="--device cuda:1 with --ray: .* use --device cuda"):
        task_resources("cuda:1", 2)


def test_without_ray_the_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives: not found, not importable
    for command in (["sweep", "--device", "cpu", "--ray", "--out", str(tmp_path / "out")],
                    ["validate", "--device", "cpu", "--placements", "resident", "vortex", "--ray"]):
        code, _, err = run_main(*command)
        assert code == 2 and err.strip() == (f"fluxkit: error: fluxkit {command[0]} --ray needs the ray package, which "
                                             "is not installed: pip install 'fluxkit[ray]'"), err


def test_the_sweep_needs_no_notebook_tool(monkeypatch, tmp_path):
    # A GPU host or Ray worker with the metrics but not the notebook tools: the sweep runs no notebook, so its
    # refusal names only what it lacks (here Ray), not nbconvert.
    for module in ("papermill", "nbconvert", "nbformat", "ipykernel", "jsonschema", "ray"):
        monkeypatch.setitem(sys.modules, module, None)
    code, _, err = run_main("sweep", "--device", "cpu", "--ray", "--out", str(tmp_path / "out"))
    assert code == 2 and "needs the ray package" in err, err
