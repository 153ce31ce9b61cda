import logging
import threading

import pytest
import torch

from conftest import PROMPT
from fluxkit.generation import clean_prompt


def test_image_shape_dtype_range(tiny_model):
    image = tiny_model.generate(PROMPT, seed=0)
    assert image.shape == (512, 512, 3) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.01  # an image, not a constant
    assert set(tiny_model.last_call.timings) == {"text_encode", "denoise", "decode", "copy"}


def test_writes_into_the_given_buffer(tiny_model):
    buffer = torch.full((512, 512, 3), -1.0)
    result = tiny_model.generate(PROMPT, seed=0, output=buffer)
    assert result is buffer
    assert buffer.min() >= 0.0
    assert torch.equal(buffer, tiny_model.generate(PROMPT, seed=0))


def test_same_seed_is_bit_identical_other_seed_differs(tiny_model):
    a = tiny_model.generate(PROMPT, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    b = tiny_model.generate(PROMPT, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, tiny_model.generate(PROMPT, seed=8))


def test_seed_none_is_drawn_and_reproducible(tiny_model):
    a = tiny_model.generate(PROMPT)
    seed = tiny_model.last_seed
    assert isinstance(seed, int) and tiny_model.last_call.seed == seed
    assert torch.equal(a, tiny_model.generate(PROMPT, seed=seed))


def test_long_prompt_is_truncated_with_warnings(tiny_model, caplog):
    long_prompt = " ".join(["a tall red lighthouse on a cliff"] * 60)
    with caplog.at_level(logging.WARNING, logger="fluxkit"):
        image = tiny_model.generate(long_prompt, seed=0)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Prompt truncated to 77 tokens") for m in messages)
    assert any("truncated to 256 T5 tokens" in m for m in messages)
    assert image.shape == (512, 512, 3)


def test_hundred_thousand_characters(tiny_model):
    image = tiny_model.generate("x" * 100_000, seed=0)
    assert image.shape == (512, 512, 3) and torch.isfinite(image).all()


def test_control_characters_are_removed(tiny_model):
    assert clean_prompt("a\x00 red\tcube\n\x1b") == "a red cube"
    assert torch.equal(tiny_model.generate("a red\x07 cube\x00", seed=3), tiny_model.generate("a red cube", seed=3))


def test_negative_prompt_acts_only_through_true_cfg(tiny_model, caplog):
    plain = tiny_model.generate(PROMPT, seed=5)
    with caplog.at_level(logging.WARNING, logger="fluxkit"):
        ignored = tiny_model.generate(PROMPT, seed=5, negative_prompt="blurry")
    assert torch.equal(plain, ignored)
    assert any("negative_prompt has no effect" in r.getMessage() for r in caplog.records)
    guided = tiny_model.generate(PROMPT, seed=5, negative_prompt="blurry", true_cfg_scale=4.0)
    assert tiny_model.last_call.true_cfg
    assert not torch.equal(plain, guided)


def test_guidance_scale_is_ignored(tiny_model):
    assert torch.equal(tiny_model.generate(PROMPT, seed=2), tiny_model.generate(PROMPT, seed=2, guidance_scale=3.5))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompt=None), TypeError, "prompt must be a str"),
    (dict(prompt=42), TypeError, "prompt must be a str"),
    (dict(prompt=["a", "b"]), TypeError, "prompt must be a str"),
    (dict(prompt=""), ValueError, "prompt is empty"),
    (dict(prompt=" \n\t "), ValueError, "prompt is empty"),
    (dict(negative_prompt=3), TypeError, "negative_prompt must be a str"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=51), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps"),
    (dict(num_inference_steps=True), TypeError, "num_inference_steps"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(guidance_scale=-1), ValueError, "guidance_scale"),
    (dict(true_cfg_scale=float("inf")), ValueError, "true_cfg_scale"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(height=500), ValueError, "height=500: must be a multiple of 16"),
    (dict(width=32), ValueError, "width"),
    (dict(output=torch.zeros(256, 256, 3)), ValueError, "output has shape"),
    (dict(output=torch.zeros(512, 512, 3, dtype=torch.float16)), ValueError, "float32"),
    (dict(output=torch.zeros(3, 512, 512).permute(1, 2, 0)), ValueError, "contiguous"),
    (dict(output=[0.0]), TypeError, "output must be a torch.Tensor"),
])
def test_bad_input_is_refused_and_the_model_stays_usable(tiny_model, kwargs, error, match):
    args = {"prompt": PROMPT, **kwargs}
    with pytest.raises(error, match=match):
        tiny_model.generate(args.pop("prompt"), **args)
    assert tiny_model.generate(PROMPT, seed=0).shape == (512, 512, 3)


def test_concurrent_calls_are_serialized(tiny_model):
    expected = {s: tiny_model.generate(PROMPT, seed=s) for s in range(3)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = tiny_model.generate(PROMPT, seed=seed)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[s], expected[s]) for s in range(3))
