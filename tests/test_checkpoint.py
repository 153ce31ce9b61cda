"""Every way a checkpoint folder can be damaged ends as VortexInitializationError naming the file, before or
during the load; nothing named in model_index.json is imported before its class is checked."""
import json
import sys

import pytest

from fluxkit import VortexInitializationError, load_flux_schnell
from fluxkit.checkpoint import read_safetensors_header
from helpers import copy_checkpoint

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


def _truncate(folder):
    path = folder / TRANSFORMER
    path.write_bytes(path.read_bytes()[:-1000])


def _garbage_header(folder):
    path = folder / TRANSFORMER
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])


def _missing_shard_of_index(folder):
    single = folder / "text_encoder_2" / "model.safetensors"
    keys = list(read_safetensors_header(single))
    single.rename(folder / "text_encoder_2" / "model-00001-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (folder / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _edit_json(relative, change):
    def damage(folder):
        path = folder / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return damage


def _write(relative, text):
    def damage(folder):
        (folder / relative).write_text(text)
    return damage


def _remove(relative):
    def damage(folder):
        target = folder / relative
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
    return damage


DAMAGE = {
    "truncated shard": (_truncate, "is not a whole safetensors file"),
    "empty shard": (_write(TRANSFORMER, ""), "shorter than a safetensors header"),
    "garbage header": (_garbage_header, "header is not valid JSON"),
    "missing shard": (_remove(TRANSFORMER), "transformer/ has no diffusion_pytorch_model.safetensors"),
    "missing shard of an index": (_missing_shard_of_index, "model-00002-of-00002.safetensors is missing"),
    "broken model_index.json": (_write("model_index.json", "{"), "model_index.json is not valid JSON"),
    "model_index.json not an object": (_write("model_index.json", "[]"), "holds list, not a JSON object"),
    "wrong pipeline class": (_edit_json("model_index.json", lambda d: d.update(_class_name="StableDiffusionPipeline")),
                             "not FluxPipeline"),
    "wrong component class": (_edit_json("model_index.json", lambda d: d.update(vae=["diffusers", "AutoencoderTiny"])),
                              "gives vae as"),
    "unexpected component": (_edit_json("model_index.json", lambda d: d.update(unet=["diffusers", "UNet2DModel"])),
                             "unexpected component 'unet'"),
    "missing component entry": (_edit_json("model_index.json", lambda d: d.pop("scheduler")), "lacks scheduler"),
    "missing component folder": (_remove("vae"), "the vae/ folder is missing"),
    "config with wrong dimensions": (_edit_json("transformer/config.json", lambda d: d.update(attention_head_dim=16)),
                                     "has shape .* but transformer/config.json implies"),
    "config not JSON": (_write("text_encoder/config.json", "nope"), "text_encoder/config.json is not valid JSON"),
    "config missing": (_remove("vae/config.json"), "vae/config.json is missing"),
    "config the class cannot build": (_edit_json("text_encoder_2/config.json", lambda d: d.update(num_heads="many")),
                                      "does not describe a valid T5EncoderModel"),
    "tensor missing": (_edit_json("transformer/config.json", lambda d: d.update(num_single_layers=2)),
                       "transformer weights lack single_transformer_blocks.1"),
    "unloadable tokenizer": (_write("tokenizer_2/tokenizer.json", "garbage"), "Loading .* failed"),
    "broken synthetic marker": (_write("fluxkit_synthetic.json", "{"), "not a valid fluxkit marker"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_a_vortex_initialization_error(tiny_dir, tmp_path, case):
    damage, match = DAMAGE[case]
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    damage(folder)
    with pytest.raises(VortexInitializationError, match=match) as info:
        load_flux_schnell(device="cpu", model=folder)
    err = info.value
    assert err.remediation and err.model_name == "flux-schnell"
    assert "Remedy:" in str(err)


def test_model_index_classes_are_checked_before_any_import(tiny_dir, tmp_path):
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    sys.modules.pop("this", None)  # importing `this` prints the Zen of Python: a visible side effect
    _edit_json("model_index.json", lambda d: d.update(text_encoder=["this", "CLIPTextModel"]))(folder)
    with pytest.raises(VortexInitializationError, match="gives text_encoder as"):
        load_flux_schnell(device="cpu", model=folder)
    assert "this" not in sys.modules


def test_an_intact_copy_loads(tiny_dir, tmp_path):
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    assert load_flux_schnell(device="cpu", model=folder).generate("a red cube", seed=0).shape == (512, 512, 3)
