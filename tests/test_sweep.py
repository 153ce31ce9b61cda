"""The quantization sweep on the tiny checkpoint (CPU): rows, fidelity to bf16, what fits, skipped variants."""
import csv
import json
import logging
import math
import os
import subprocess

import pytest

from fluxkit.errors import InputError
from fluxkit.lab import plots
from fluxkit.lab.metrics import load_clip, load_lpips
from fluxkit.lab.prompts import read_prompts, reference_prompts
from fluxkit.lab.sweep import (
    Variant,
    compile_axis,
    content_differences,
    fits,
    load_result,
    load_times,
    measure_in_fresh_process,
    sweep,
    variants,
    write_csv,
)
from helpers import run_main

ONE_PROMPT = reference_prompts()[:1]


@pytest.fixture(scope="module")
def clip():
    return load_clip("ViT-B-32", "openai")


def test_variants_start_with_the_reference_and_cover_the_t5_axis():
    names = [v.name for v in variants(["nf4", "int8", "bf16"])]
    assert names == ["bf16@resident", "nf4@resident", "nf4+t5-bf16@resident", "int8@resident", "int8+t5-bf16@resident"]
    unquantized_t5 = Variant("nf4", False, "resident").resolved_preset()
    assert unquantized_t5.quantization.components == ("transformer",)
    eager = Variant("nf4", True, "resident", compiled=False)
    assert eager.name == "nf4+eager@resident" and eager.resolved_preset().compile is False
    assert eager.resolved_preset().cuda_graphs is False  # eager means no fast path at all
    assert Variant("nf4", True, "resident", compiled=True).resolved_preset().cuda_graphs  # as the preset says


def test_the_t5_and_compile_axes_can_be_narrowed():
    """A GPU sweep with little time left measures one side of an axis (`fluxkit sweep --t5 ... --compile ...`)."""
    quantized = [v.name for v in variants(["nf4", "gguf-q4_0"], t5=(True,))]
    assert quantized == ["bf16@resident", "nf4@resident", "gguf-q4_0+t5-bf16@resident"]  # GGUF never quantizes T5
    assert [v.name for v in variants(["nf4"], t5=(False,))] == ["bf16@resident", "nf4+t5-bf16@resident"]
    both = compile_axis(variants(["nf4"], t5=(True,)))
    assert [(v.name, v.compiled) for v in both] == [("bf16@resident", True), ("bf16+eager@resident", False),
                                                     ("nf4@resident", True), ("nf4+eager@resident", False)]
    assert [v.name for v in compile_axis(variants(["nf4"], t5=(True,)), (False,))] == ["bf16+eager@resident",
                                                                                        "nf4+eager@resident"]


@pytest.fixture(scope="module")
def result(tiny_dir, clip, tmp_path_factory):
    chosen = variants(["nf4", "int8", "torchao-int8wo", "fp8-layerwise", "torchao-fp8dq", "gguf-q4_0"])
    return sweep(str(tiny_dir), "cpu", chosen, clip, iterations=2, prompts=ONE_PROMPT)


def test_every_variant_is_measured_and_scored_against_bf16(result):
    rows = {r["variant"]: r for r in result["rows"]}
    skipped = {name: rows.pop(name)["skipped"] for name in list(rows) if "skipped" in rows[name]}
    assert set(skipped) == {"torchao-fp8dq@resident", "torchao-fp8dq+t5-bf16@resident"}  # CPU: no float8 matmul
    assert all("compute capability 8.9" in reason for reason in skipped.values())
    assert set(rows) == {"bf16@resident", "nf4@resident", "nf4+t5-bf16@resident", "int8@resident",
                         "int8+t5-bf16@resident", "torchao-int8wo@resident", "torchao-int8wo+t5-bf16@resident",
                         "fp8-layerwise@resident", "fp8-layerwise+t5-bf16@resident",
                         "gguf-q4_0+t5-bf16@resident"}  # GGUF leaves T5 in bf16
    assert rows["bf16@resident"]["fidelity"]["psnr_db"] == math.inf  # the reference against itself
    for name, row in rows.items():
        assert row["latency"]["n"] == 2 and row["load_s"] > 0
        if name != "bf16@resident":
            assert row["fidelity"]["psnr_db"] < math.inf and -1 <= row["fidelity"]["ssim"] <= 1
    assert rows["nf4@resident"]["weights"]["transformer"] < rows["int8@resident"]["weights"]["transformer"] \
        < rows["bf16@resident"]["weights"]["transformer"]
    assert rows["torchao-int8wo@resident"]["weights"]["transformer"] < rows["bf16@resident"]["weights"]["transformer"]
    assert rows["gguf-q4_0+t5-bf16@resident"]["weights"]["transformer"] < rows["bf16@resident"]["weights"]["transformer"]
    assert rows["gguf-q4_0+t5-bf16@resident"]["gguf_write_s"] >= 0 and rows["nf4@resident"]["gguf_write_s"] is None
    assert rows["nf4+t5-bf16@resident"]["weights"]["text_encoder_2"] > rows["nf4@resident"]["weights"]["text_encoder_2"]
    assert "not image quality" in result["fidelity_note"] and result["published"]
    lpips, note = load_lpips()  # computed where its backbone is cached, else the reason is in the result
    assert result["lpips"] == note and all(("lpips" in r["fidelity"]) == (lpips is not None) for r in rows.values())


def test_load_times_with_quantize_on_load_and_from_a_prequantized_folder(result):
    rows = {r["variant"]: r for r in result["rows"] if "skipped" not in r}
    for name in ("nf4@resident", "nf4+t5-bf16@resident"):  # bitsandbytes 4-bit: saved, then loaded back
        pre = rows[name]["prequantized"]
        assert pre["weights_s"] > 0 and pre["quantize_on_load_weights_s"] > 0 and pre["save_s"] > 0
        assert set(rows[name]["load_stages_s"]) >= {"checks and plan", "transformer", "text_encoder_2"}
    assert "not saved pre-quantized" in rows["int8@resident"]["prequantized"]["reason"]
    assert "not saved pre-quantized" in rows["torchao-int8wo@resident"]["prequantized"]["reason"]
    assert "GGUF file" in rows["gguf-q4_0+t5-bf16@resident"]["prequantized"]["reason"]
    assert "unquantized" in rows["bf16@resident"]["prequantized"]["reason"]
    table = {t["variant"]: t for t in load_times(result)}
    assert set(table) == set(rows)
    assert table["nf4@resident"]["prequantized_s"] == round(rows["nf4@resident"]["prequantized"]["weights_s"], 3)
    assert isinstance(table["int8@resident"]["prequantized_s"], str)  # the reason


def test_two_sweeps_compared_beyond_their_timing(result):
    """What a sweep on Ray is checked by against the serial one: every column but timing and placement of the run."""
    import copy

    rows = result["rows"]
    other = copy.deepcopy(rows[1:])  # the reference's row missing
    other[0]["latency"]["p50"] *= 2  # timing: may differ
    other[0]["ran_on"] = {"node": "elsewhere"}
    other[1]["fidelity"]["psnr_db"] += 0.5  # a result: may not
    other[2]["resident_bytes"] = 1
    assert content_differences(rows[1:], copy.deepcopy(rows[1:])) == []
    assert content_differences(rows, other) == [f"{rows[0]['variant']}: only in the first",
                                                f"{rows[2]['variant']}: fidelity",
                                                f"{rows[3]['variant']}: resident_bytes"]


def test_the_fits_table_and_the_csv(result, tmp_path):
    table = fits(result, budget_gb=0.014)  # between the tiny nf4 (13.6 MB planned) and bf16 (14.5 MB) plans
    fitting = {m["variant"] for m in table["variants"] if m["fits"]}
    assert "bf16@resident" not in fitting and "nf4@resident" in fitting
    assert table["fastest_within"] in fitting and all(not m["measured"] for m in table["variants"])
    rows = list(csv.DictReader(open(write_csv(result, tmp_path / "sweep.csv"))))
    assert [r["variant"] for r in rows] == [r["variant"] for r in result["rows"]] and rows[1]["psnr_db"]
    nf4 = next(r for r in rows if r["variant"] == "nf4@resident")
    assert float(nf4["prequantized_weights_load_s"]) > 0 and float(nf4["weights_load_s"]) > 0


def test_a_variant_the_device_cannot_run_stays_with_its_reason(tiny_dir, clip, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = sweep(str(tiny_dir), "cuda", variants(["nf4"]), clip, iterations=1, prompts=ONE_PROMPT)
    assert all("no usable CUDA GPU" in r["skipped"] for r in result["rows"])
    assert fits(result, 6.0) == {"budget_gb": 6.0, "variants": [], "fastest_within": None}


def test_each_row_is_kept_as_soon_as_it_is_measured(tiny_dir, clip, tmp_path):
    """A sweep stopped part-way (a lease that ends) keeps the rows it finished."""
    partial = tmp_path / "rows.jsonl"
    result = sweep(str(tiny_dir), "cpu", variants(["int8", "torchao-fp8dq"]), clip, iterations=1,
                   prompts=ONE_PROMPT, partial=partial)
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [r["variant"] for r in kept] == [r["variant"] for r in result["rows"]]  # skipped rows too, in order
    assert kept[1]["latency"] == result["rows"][1]["latency"] and "skipped" in kept[-1]
    assert all("images" not in r and "fidelity" not in r for r in kept)  # scored only once all have run


def test_a_variant_that_stalls_is_stopped(tiny_dir, tmp_path):
    """On a GPU each variant runs in its own process; one that overruns its time (a compile that never ends) is
    stopped, and its row keeps the reason. Driven here on the CPU through the same fresh-process path."""
    import time

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish within 0.5 s"):  # importing alone takes longer
        measure_in_fresh_process(str(tiny_dir), "cpu", Variant("nf4", True, "resident"), 1, tmp_path, ONE_PROMPT, 0.5)
    assert time.perf_counter() - start < 30  # stopped at its limit, not run to the end


def test_a_stopped_process_says_where_its_threads_were(caplog):
    """A measurement stopped at its time limit writes its threads' stacks first: where a stalled run stalled."""
    from fluxkit.lab.fresh import FreshProcessError, call_in_fresh_process

    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # not holding the pipes of the stopped one
    with pytest.raises(FreshProcessError, match="did not finish within 8 s; stopped"):
        call_in_fresh_process("subprocess:run", {"args": ["sleep", "20"], **quiet}, timeout_s=8)
    [stopped] = [r.getMessage() for r in caplog.records if "stopped after 8 s" in r.getMessage()]
    assert "subprocess.py" in stopped and "in run" in stopped and "fresh.py" in stopped, stopped


def test_a_variant_process_that_fails_gives_its_whole_reason_and_its_log(tiny_dir, tmp_path, caplog):
    """The fresh-process path keeps the error itself, not the last line of a traceback (a multi-line compile error
    once kept only " Remedy: ..."), and hands the process's log records to this one's logging, as made (a run cut
    short keeps its progress). Driven on the CPU, where float8 matmuls cannot run."""
    with pytest.raises(RuntimeError) as info:
        measure_in_fresh_process(str(tiny_dir), "cpu", Variant("torchao-fp8dq", True, "resident"), 1, tmp_path,
                                 ONE_PROMPT, 300)
    reason = str(info.value)
    assert reason.startswith("VortexInitializationError: preset torchao-fp8dq cannot run"), reason
    assert "compute capability 8.9" in reason and "Remedy:" in reason and "\n" not in reason
    [record] = [r for r in caplog.records if r.process != os.getpid()]  # the load's structured error, once
    assert record.name == "fluxkit" and record.levelno == logging.ERROR and record.structured
    assert json.loads(record.getMessage())["model_name"] == "flux-schnell"


def test_prompt_files(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("cases:\n  - {name: cat, prompt: a cat, seed: 1}\n")
    assert read_prompts(good) == [{"name": "cat", "prompt": "a cat", "seed": 1}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases: [a cat]\n")
    with pytest.raises(InputError, match="case 0: expected exactly the keys name, prompt and seed"):
        read_prompts(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("cases: [{name: a, prompt: x, seed: 1}, {name: a, prompt: y, seed: 2}]\n")
    with pytest.raises(InputError, match="name 'a' is used twice"):
        read_prompts(twice)


def test_sweep_cli_with_placements_as_a_third_axis(tiny_dir, tmp_path):
    (tmp_path / "one.yaml").write_text("cases: [{name: cat, prompt: a cat on a red roof, seed: 3}]\n")
    code, out, err = run_main("sweep", "--model", str(tiny_dir), "--device", "cpu", "--variants", "nf4", "gguf-q4_0",
                              "--placement", "resident", "vortex", "--iterations", "1", "--clip-model", "ViT-B-32",
                              "--prompts", str(tmp_path / "one.yaml"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "sweep.json").is_file() and (tmp_path / "out" / "sweep.csv").is_file()
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]}
    assert {"nf4@resident", "nf4@vortex", "gguf-q4_0+t5-bf16@resident"} <= {n for n, r in rows.items()
                                                                           if "skipped" not in r}
    assert "streams modulation layers" in rows["gguf-q4_0+t5-bf16@vortex"]["skipped"]  # kept, with the reason
    assert "nf4@vortex" in out and "fastest within 6.0 GB" in out
    assert not (tmp_path / "out" / "sweep.partial.jsonl").exists()  # complete: sweep.json holds every row
    # a saved sweep is read back as it was measured (the reference's infinite PSNR a float again) and plotted
    saved = load_result(tmp_path / "out" / "sweep.json")
    assert saved["rows"][0]["fidelity"]["psnr_db"] == math.inf and fits(saved, 6.0)["budget_gb"] == 6.0
    plots.sweep_pareto(saved, tmp_path / "out")
    assert any((tmp_path / "out").glob("*.png"))
