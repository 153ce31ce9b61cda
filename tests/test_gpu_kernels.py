"""GPU: the profiler finds each phase's GPU time, graph replays and streamed weights included: what
`fluxkit.estimate` scales to other cards."""
import pytest

from fluxkit import load_flux_schnell
from fluxkit.lab.bench import kernel_seconds

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("placement", ["resident", "vortex"])  # replayed graphs; uncaptured, T5 streamed
def test_each_phase_has_its_gpu_time_inside_its_window(tiny_dir, placement):
    model = load_flux_schnell(device="cuda", quantization="nf4", model=tiny_dir, placement=placement)
    kernels = kernel_seconds(model)
    seconds, windows = kernels["seconds"], kernels["window_s"]
    for phase in ("text_encode", "denoise", "decode"):
        assert seconds[phase]["compute"] > 0 and seconds[phase]["memory"] > 0, (phase, seconds[phase])
    assert seconds["copy"]["host link"] > 0  # the image to the host buffer
    for phase, s in seconds.items():
        assert s["compute"] + s["memory"] <= windows[phase], (phase, s, windows[phase])
    if placement == "vortex":
        assert seconds["text_encode"]["host link"] > 0  # T5's weights cross the link every call
