"""GPU: fluxkit's CUDA graphs (fastpath.GraphedCall) on the tiny checkpoint: a replay gives the image of the same
compiled modules run without graphs, bit for bit in one process, whatever holds the outputs of earlier replays."""
import pytest
import torch

from fluxkit import load_flux_schnell
from fluxkit.config import available_presets, load_preset
from fluxkit.fastpath import MAX_GRAPHS_PER_CALL
from helpers import PROMPT, uncaptured

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=[name for name in available_presets() if load_preset(name).cuda_graphs])
def graphed_model(tiny_dir, request):
    """Each preset that turns CUDA graphs on."""
    model = load_flux_schnell(device="cuda", quantization=request.param, model=tiny_dir)
    assert model.info()["cuda_graphs"] and set(model.fast.graphed) == {"embed", "transformer", "decode"}
    return model


def test_a_replay_gives_the_uncaptured_image(graphed_model):
    graphed = graphed_model.generate(PROMPT, seed=3)
    with uncaptured(graphed_model):
        eager = graphed_model.generate(PROMPT, seed=3)
    assert torch.equal(graphed, eager)
    assert graphed_model.generate("another prompt, other tokens", seed=4).shape == (512, 512, 3)
    assert {name: len(call.graphs) for name, call in graphed_model.fast.graphed.items()} == \
        {"embed": 1, "transformer": 1, "decode": 1}  # the warm-up's capture serves every 512x512 call


def test_true_cfg_keeps_both_predictions_of_a_step(graphed_model):
    """Two transformer replays per step: without cloning, the second overwrites the first's prediction."""
    args = dict(negative_prompt="blurry", true_cfg_scale=4.0, seed=5)
    graphed = graphed_model.generate(PROMPT, **args)
    with uncaptured(graphed_model):
        eager = graphed_model.generate(PROMPT, **args)
    assert torch.equal(graphed, eager)


def test_each_image_size_is_captured_once_and_their_number_is_bounded(graphed_model):
    sizes = [(256, 256), (256, 384), (384, 256), (384, 384), (512, 256)]
    for height, width in sizes + sizes[:1]:
        image = graphed_model.generate(PROMPT, seed=6, height=height, width=width)
    with uncaptured(graphed_model):
        assert torch.equal(image, graphed_model.generate(PROMPT, seed=6, height=256, width=256))
    assert len(graphed_model.fast.graphed["transformer"].graphs) == MAX_GRAPHS_PER_CALL
    assert len(graphed_model.fast.graphed["embed"].graphs) == 1  # token ids have one shape whatever the image size
    beyond = graphed_model.generate(PROMPT, seed=6, height=512, width=256)  # uncaptured: past the bound
    with uncaptured(graphed_model):
        assert torch.equal(beyond, graphed_model.generate(PROMPT, seed=6, height=512, width=256))


def test_placements_that_move_weights_during_a_call_run_uncaptured(tiny_dir):
    model = load_flux_schnell(device="cuda", quantization="nf4", model=tiny_dir, placement="vortex")
    assert model.preset.cuda_graphs and not model.info()["cuda_graphs"]
    assert model.generate(PROMPT, seed=3).shape == (512, 512, 3)
