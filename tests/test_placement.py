"""Placements move components, not results: the same seed gives the same image wherever the weights live."""
import gc

import pytest
import torch
from test_plan import share_streaming_some_modulation

import helpers
from fluxkit import VortexInitializationError, load_flux_schnell, load_preset
from fluxkit.errors import InputError
from fluxkit.lab.profiling import compare_placements, cotenancy, cotenancy_table, placement_table, profile_vram
from fluxkit.placement import ModulationOutput
from fluxkit.sampling import PHASES
from helpers import PROMPT, t5_unquantized, with_budgets

# Batching the 4 steps' modulation projections changes the float32 summation order: measured max |diff| 1.1e-6.
PLACEMENT_TOLERANCE = 1e-5
# A parked layer runs bitsandbytes' CPU 4-bit kernel (bf16 inside on AVX512-BF16 CPUs) on a fresh copy of its
# weights; the resident one was repacked for that kernel once: measured max |diff| 5.7e-3 on the tiny checkpoint.
STREAMED_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def resident_images(tiny_dir):
    return helpers.resident_images(tiny_dir, "cpu", seed=4)


@pytest.mark.parametrize("placement", ["resident", "vortex", "offload"])
def test_every_placement_gives_the_resident_image(tiny_dir, resident_images, placement):
    resident_image = resident_images(placement)
    model = load_flux_schnell(device="cpu", quantization=t5_unquantized(), model=tiny_dir, placement=placement)
    image = model.generate(PROMPT, seed=4)
    assert model.info()["placement"]["name"] == placement
    if placement == "vortex":  # modulation runs once per call for all steps: other summation order
        assert (image - resident_image).abs().max() <= PLACEMENT_TOLERANCE
    else:
        assert torch.equal(image, resident_image)


def test_streamed_modulation_gives_the_resident_image(tiny_dir, resident_images):
    preset = t5_unquantized()
    preset = with_budgets(preset, vortex_total_gb=5.8 + share_streaming_some_modulation(tiny_dir, preset),
                          rest_of_vortex_gb=5.8)
    model = load_flux_schnell(device="cpu", quantization=preset, model=tiny_dir, placement="vortex")
    assert model.modulation.parked and model.info()["placement"]["modulation_streamed"] == len(model.modulation.parked)
    outputs = [m for m in model.pipe.transformer.modules() if isinstance(m, ModulationOutput)]
    assert len(outputs) == 4 and sum(m.source is None for m in outputs) == len(model.modulation.parked)
    assert (model.generate(PROMPT, seed=4) - resident_images("vortex")).abs().max() <= STREAMED_TOLERANCE


def test_true_cfg_under_vortex(tiny_dir):
    resident = helpers.resident_like(tiny_dir, "vortex", "cpu")
    vortex = load_flux_schnell(device="cpu", quantization=t5_unquantized(), model=tiny_dir, placement="vortex")
    kwargs = dict(negative_prompt="blurry", true_cfg_scale=3.0, seed=2)
    assert (vortex.generate(PROMPT, **kwargs) - resident.generate(PROMPT, **kwargs)).abs().max() <= PLACEMENT_TOLERANCE


def test_vortex_keeps_t5_in_the_model_dtype(tiny_dir):
    model = load_flux_schnell(device="cpu", quantization="nf4", model=tiny_dir, placement="vortex")
    assert not any(type(m).__name__ == "Linear4bit" for m in model.pipe.text_encoder_2.modules())
    assert any("T5 is streamed in the model dtype" in note for note in model.plan.notes)


def test_a_bad_placement_lists_the_valid_ones(tiny_dir):
    with pytest.raises(VortexInitializationError, match="placement='gpu'.*resident, vortex, offload") as info:
        load_flux_schnell(device="cpu", model=tiny_dir, placement="gpu")
    assert isinstance(info.value, ValueError)
    with pytest.raises(TypeError, match="placement must be a str"):
        load_flux_schnell(device="cpu", model=tiny_dir, placement=6)


def test_preset_placement_is_the_default(tiny_dir):
    import dataclasses

    preset = dataclasses.replace(load_preset("nf4"), placement="vortex")
    assert load_flux_schnell(device="cpu", quantization=preset, model=tiny_dir).placement.name == "vortex"


@pytest.mark.parametrize("placement", ["resident", "vortex", "offload"])
def test_a_call_frees_its_memory_without_the_garbage_collector(tiny_dir, placement):
    """Whatever a call allocates is freed when the call ends, not whenever the garbage collector runs: a reference
    cycle holding device tensors costs GPU memory that no plan counts (on the H200 it made the vortex placement run
    out of its share). Streamed modulation layers included."""
    preset = load_preset("nf4")
    if placement == "vortex":
        preset = with_budgets(preset, vortex_total_gb=5.8 + share_streaming_some_modulation(tiny_dir, preset),
                              rest_of_vortex_gb=5.8)
    model = load_flux_schnell(device="cpu", quantization=preset, model=tiny_dir, placement=placement)
    assert placement != "vortex" or model.modulation.parked
    model.generate(PROMPT, seed=0)  # the first call sets lazy state (compute types, kernel packing)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        model.generate(f"{PROMPT}, again", seed=1)
        gc.collect()
        held = [type(o).__name__ for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not held


def test_the_vram_profile_runs_t5_in_every_call_it_measures(tiny_model):
    """A call served from the prompt cache skips T5: a profile of such calls misses the text encode's memory."""
    hits = tiny_model.prompt_cache.hits
    profile = profile_vram(tiny_model, drift_calls=2)
    assert tiny_model.prompt_cache.hits == hits
    assert [m["phase"] for m in profile["timeline"]] == ["load", *PHASES]


def test_the_cotenancy_check_says_why_not_on_cpu(tiny_dir):
    rows = cotenancy(str(tiny_dir), "cpu", "nf4", ["vortex", "resident", "nowhere"], calls=2)
    assert [r["placement"] for r in rows] == ["vortex", "resident", "nowhere"]
    assert all(r["applicable"] is False and "CUDA" in r["reason"] for r in rows[:2])
    assert "placement" in rows[2]["error"] and "vortex" in rows[2]["error"]  # a bad name lists the valid ones
    assert [t["outcome"] for t in cotenancy_table(rows)] == [rows[0]["reason"], rows[1]["reason"], rows[2]["error"]]
    for measure in (cotenancy, compare_placements):  # refused before a process loads a model to time no call
        with pytest.raises(InputError, match="calls=0"):
            measure(str(tiny_dir), "cpu", "nf4", ["vortex"], calls=0)


def test_the_planner_error_of_a_zero_byte_plan_is_absolute():
    """`offload` plans 0 resident bytes: a relative error is undefined there (the H200 run printed 3.5e9 %)."""
    def row(placement, planned, resident):
        return {"placement": placement, "resident": resident, "plan": {"resident_bytes": planned, "peak_bytes": 0,
                "host_bytes": 0}, "peak_allocated": resident, "peak_reserved": resident, "rise": 0,
                "host_rss_added": 0, "latency": {"p50": 1.0}}

    offload, vortex = placement_table([row("offload", 0, 35_000_000), row("vortex", 5_491_000_000, 5_550_000_000)])
    assert (offload["resident_error_gb"], offload["resident_error_pct"]) == (0.035, None)
    assert (vortex["resident_error_gb"], vortex["resident_error_pct"]) == (0.059, 1.07)
