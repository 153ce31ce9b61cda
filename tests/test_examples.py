"""The examples run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_vortex_director_runs_its_slots_into_one_buffer(tiny_dir):
    run = subprocess.run([sys.executable, str(EXAMPLES / "vortex_director.py"), "--device", "cpu", "--model",
                          str(tiny_dir), "--slots", "3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert lines[0]["placement"] == "resident" and "CPU" in lines[0]["why"]
    assert lines[0]["quantized_layers"]["transformer"] == {"bitsandbytes.nn.Linear4bit": 28}
    slots = lines[1:-1]
    assert [s["slot"] for s in slots] == [0, 1, 2]
    assert all(s["in_range"] and s["buffer_reused"] and set(s["phases_s"]) == {"text_encode", "denoise", "decode",
                                                                                "copy"} for s in slots)
    assert lines[-1]["vram"]["measured"] is False  # on a CPU; the GPU host reads the peak and the drift
