"""The sampling functions: the same image as diffusers' FluxPipeline, and every bad input refused before work."""
import mmap

import numpy as np
import pytest
import torch

from fluxkit.errors import InputError, InputTypeError
from fluxkit.sampling import check_inputs, clean_prompt
from helpers import PROMPT


def test_same_image_as_the_diffusers_pipeline(tiny_model):
    pipe = tiny_model.pipe
    with torch.inference_mode():
        expected = pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=0.0, height=512, width=512,
                        max_sequence_length=256, generator=torch.Generator("cpu").manual_seed(11),
                        output_type="pt").images[0].permute(1, 2, 0)
    assert torch.equal(tiny_model.generate(PROMPT, seed=11), expected)


def test_true_cfg_matches_the_diffusers_pipeline(tiny_model):
    with torch.inference_mode():
        expected = tiny_model.pipe(prompt=PROMPT, negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=4,
                                   guidance_scale=0.0, height=512, width=512, max_sequence_length=256,
                                   generator=torch.Generator("cpu").manual_seed(5),
                                   output_type="pt").images[0].permute(1, 2, 0)
    assert torch.equal(tiny_model.generate(PROMPT, negative_prompt="blurry", true_cfg_scale=4.0, seed=5), expected)


def _check(**kwargs):
    args = dict(negative_prompt="", num_inference_steps=None, guidance_scale=0.0, true_cfg_scale=1.0, height=None,
                width=None, seed=0, output=None)
    args.update(kwargs)
    from fluxkit import load_preset

    return check_inputs(args.pop("prompt", PROMPT), spec=load_preset("nf4").generation, **args)


def _readonly_memmap(tmp_path):
    path = tmp_path / "buffer.f32"
    np.zeros((512, 512, 3), dtype=np.float32).tofile(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(512, 512, 3))


def _tensor_over_readonly_memory(tmp_path):
    path = tmp_path / "buffer.bin"
    path.write_bytes(bytes(512 * 512 * 3 * 4))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with pytest.warns(UserWarning):  # torch warns that the buffer is not writable, and would then crash on write
        return torch.frombuffer(mapped, dtype=torch.float32).view(512, 512, 3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompt=None), InputTypeError, "prompt must be a str"),
    (dict(prompt=["a", "b"]), InputTypeError, "prompt must be a str"),
    (dict(prompt=""), InputError, "prompt is empty"),
    (dict(prompt=" \n\t "), InputError, "prompt is empty"),
    (dict(prompt="\u200b\u200c\u2060\ufeff"), InputError, "invisible characters only"),
    (dict(prompt="\u3164\u3164"), InputError, "invisible characters only"),  # Hangul filler: a blank letter
    (dict(prompt="\u2800 \u2800"), InputError, "invisible characters only"),  # the Braille blank
    (dict(prompt="\u0301\u0308\u20dd"), InputError, "invisible characters only"),  # combining marks on nothing
    (dict(prompt="\u115f\u1160\uffa0\u17b4\u180e"), InputError, "invisible characters only"),
    (dict(prompt="a cat \ud83d"), InputError, r"unpaired surrogate \(U\+D83D at index 6\)"),
    (dict(negative_prompt=3), InputTypeError, "negative_prompt must be a str"),
    (dict(num_inference_steps=0), InputError, "num_inference_steps"),
    (dict(num_inference_steps=51), InputError, "num_inference_steps"),
    (dict(num_inference_steps=2.5), InputTypeError, "num_inference_steps"),
    (dict(num_inference_steps=True), InputTypeError, "num_inference_steps"),
    (dict(guidance_scale=float("nan")), InputError, "guidance_scale"),
    (dict(guidance_scale=-1), InputError, "guidance_scale"),
    (dict(true_cfg_scale=float("inf")), InputError, "true_cfg_scale"),
    (dict(seed=-1), InputError, "seed"),
    (dict(seed=2**63), InputError, "seed"),
    (dict(seed=10**400), InputError, r"seed=10+\.\.\. \(401 digits\)"),
    (dict(seed="1"), InputTypeError, "seed"),
    (dict(height=500), InputError, "height=500: must be a multiple of 16"),
    (dict(width=32), InputError, "width"),
    (dict(output=torch.zeros(256, 256, 3)), InputError, "output has shape"),
    (dict(output=torch.zeros(512, 512, 3, dtype=torch.float16)), InputError, "float32"),
    (dict(output=torch.zeros(3, 512, 512).permute(1, 2, 0)), InputError, "contiguous"),
    (dict(output=torch.zeros(512, 512, 3, device="meta")), InputError, "meta device"),
    (dict(output=torch.zeros(512, 512, 3, requires_grad=True)), InputError, "requires grad"),
    (dict(output=[0.0]), InputTypeError, "output must be a torch.Tensor or a NumPy array"),
    (dict(output=np.zeros((512, 512, 3), dtype=np.float64)), InputError, "float32"),
    ("readonly_memmap", InputError, "read-only NumPy array"),
    ("readonly_tensor", InputError, "memory is read-only"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, kwargs, error, match):
    if kwargs == "readonly_memmap":
        kwargs = dict(output=_readonly_memmap(tmp_path))
    elif kwargs == "readonly_tensor":
        kwargs = dict(output=_tensor_over_readonly_memory(tmp_path))
    with pytest.raises(error, match=match) as info:
        _check(**kwargs)
    assert isinstance(info.value, ValueError if error is InputError else TypeError)


def test_settings_come_from_the_preset_unless_given():
    request, buffer = _check()
    assert (request.num_inference_steps, request.height, request.width, request.max_sequence_length) == (4, 512, 512, 256)
    assert buffer is None
    request, _ = _check(num_inference_steps=2, height=256, width=384)
    assert (request.num_inference_steps, request.height, request.width) == (2, 256, 384)


def test_prompt_text_is_cleaned():
    assert clean_prompt("a\x00 red\tcube\n\x1b") == "a red cube"
    assert clean_prompt("a \u200bcat") == "a \u200bcat"  # invisible characters are kept when there is text
    assert clean_prompt("cafe\u0301 \u3164") == "cafe\u0301 \u3164"
    assert clean_prompt("", allow_empty=True) == ""


def test_a_writable_memmap_is_written_in_place(tiny_model, tmp_path):
    path = tmp_path / "buffer.f32"
    np.zeros((512, 512, 3), dtype=np.float32).tofile(path)
    buffer = np.memmap(path, dtype=np.float32, mode="r+", shape=(512, 512, 3))
    assert tiny_model.generate(PROMPT, seed=0, output=buffer) is buffer
    assert np.array_equal(np.asarray(buffer), tiny_model.generate(PROMPT, seed=0).numpy())
