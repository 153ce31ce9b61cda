"""The sweep on a Ray cluster (`fluxkit sweep --ray`): a local cluster with two workers on this machine's CPUs runs
the tiny checkpoint's sweep, each variant a task in a fresh process, with the serial sweep's rows."""
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from fluxkit.lab.sweep import Variant, content_differences, sweep, variants
from helpers import run_main

ray = pytest.importorskip("ray")

PROMPTS = [{"name": "cat", "prompt": "a cat on a red roof", "seed": 3}]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster (two workers: this machine's two CPUs) for the module: each sweep joins it."""
    from fluxkit.lab.cluster import connect

    assert connect("local")
    assert ray.cluster_resources().get("CPU", 0) >= 2
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


def test_variants_that_fail_or_run_out_of_time_keep_their_rows(tiny_dir, cluster, clip):
    [raised] = sweep(str(tiny_dir), "cpu", [Variant("torchao-fp8dq", True, "resident")], clip, iterations=1,
                     prompts=PROMPTS, ray="auto")["rows"]
    assert "compute capability 8.9" in raised["skipped"] and "ran_on" in raised
    [stalled] = sweep(str(tiny_dir), "cpu", [Variant("nf4", True, "resident")], clip, iterations=1, prompts=PROMPTS,
                      variant_timeout_s=0.5, ray="auto")["rows"]
    assert "did not finish within 0.5 s" in stalled["skipped"] and stalled["variant"] == "nf4@resident"


def test_without_ray_the_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives: not found, not importable
    for command in (["sweep", "--device", "cpu", "--ray", "--out", str(tmp_path / "out")],
                    ["validate", "--device", "cpu", "--placements", "resident", "vortex", "--ray"]):
        code, _, err = run_main(*command)
        assert code == 2 and err.strip() == (f"fluxkit: error: fluxkit {command[0]} --ray needs the ray package, which "
                                             "is not installed: pip install 'fluxkit[ray]'"), err
