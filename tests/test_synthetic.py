import json
import time

import pytest
from safetensors import safe_open

from fluxkit.synthetic import MARKER_FILE, read_marker, write_synthetic
from helpers import digest


def test_layout_and_marker(tiny_dir):
    for sub in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"):
        assert (tiny_dir / sub).is_dir()
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert read_marker(tiny_dir)["preset"] == "tiny" and read_marker(tiny_dir)["synthetic"] is True
    assert not list(tiny_dir.rglob("*.bin")) and not list(tiny_dir.rglob("*.pt"))
    assert list(tiny_dir.rglob("*.safetensors"))


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_dir):
    start = time.perf_counter()
    again = write_synthetic(tmp_path / "again", "tiny", seed=0)
    assert time.perf_counter() - start < 60
    assert digest(again) == digest(tiny_dir)
    other = write_synthetic(tmp_path / "other", "tiny", seed=1)
    a, b = digest(tiny_dir), digest(other)
    weight_files = [k for k in a if k.endswith(".safetensors")]
    assert all(a[k] != b[k] for k in weight_files)
    assert json.loads((other / MARKER_FILE).read_text())["seed"] == 1


def test_quantizable_widths_are_multiples_of_64(tiny_dir):
    with safe_open(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if key.endswith(".weight") and len(shape) == 2:
                assert shape[1] % 64 == 0, key


def test_clip_tokenizer_is_openais_vocabulary(tiny_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthetic checkpoint"):
        write_synthetic(tmp_path, "tiny", seed=0)
    assert (tmp_path / "keep.txt").read_text() == "mine"
