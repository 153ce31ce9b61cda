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


# ---- pre-quantized folders: checked like checkpoints, and against the preset -----------------------------------

PQ_TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
PQ_T5 = "text_encoder_2/model.safetensors"
LAYER = "context_embedder.weight"


def _tensors(relative, change):
    """Rewrite one safetensors file of the folder with `change(tensors)` applied."""
    def damage(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / relative)
        change(tensors)
        save_file(tensors, folder / relative, metadata={"format": "pt"})
    return damage


def _blob(relative, layer, change):
    """Edit the JSON of one weight's serialized quant state."""
    def edit(tensors):
        import torch

        key = next(k for k in tensors if k.startswith(f"{layer}.quant_state."))
        state = json.loads(bytes(tensors[key].tolist()))
        change(state)
        tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return _tensors(relative, edit)


def _set(key, value):
    def change(tensors):
        tensors[key] = value(tensors.get(key)) if callable(value) else value
    return change


def _nan(t):
    t = t.clone()
    t[0] = float("nan")
    return t


def _code(t):
    t = t.clone()
    t[3] += 0.01
    return t


PREQUANTIZED_DAMAGE = {
    "quantization_config null": (_edit_json("transformer/config.json", lambda d: d.update(quantization_config=None)),
                                 "has shape .* but transformer/config.json implies"),
    "quantization_config a string": (_edit_json("transformer/config.json",
                                                lambda d: d.update(quantization_config="nf4")), "not a mapping"),
    "absmax cut short": (_tensors(PQ_TRANSFORMER, _set(f"{LAYER}.absmax", lambda t: t[:10])),
                         rf"{LAYER}.absmax is U8 of shape \[10\], but its config and quantization imply U8"),
    "packed weight cut short": (_tensors(PQ_TRANSFORMER, _set(LAYER, lambda t: t[:100])), rf"tensor {LAYER} is U8"),
    "absmax of another dtype": (_tensors(PQ_TRANSFORMER, _set(f"{LAYER}.absmax", lambda t: t.float())),
                                rf"{LAYER}.absmax is F32"),
    "quant map missing": (_tensors(PQ_TRANSFORMER, lambda t: t.pop(f"{LAYER}.quant_map")),
                          rf"lacks {LAYER}.quant_map"),
    "unexpected tensor": (_tensors(PQ_TRANSFORMER, _set("extra.weight", lambda _: __import__("torch").zeros(3))),
                          "unexpected tensor extra.weight"),
    "block size": (_blob(PQ_TRANSFORMER, LAYER, lambda s: s.update(blocksize=32)), "in blocks of 32"),
    "quant state shape": (_blob(PQ_TRANSFORMER, LAYER, lambda s: s.update(shape=[32, 128])),
                          rf"{LAYER.removesuffix('.weight')} has quant state shape \[32, 128\]"),
    "quant type": (_blob(PQ_TRANSFORMER, LAYER, lambda s: s.update(quant_type="fp4")), "is fp4 in blocks of 64"),
    "quant state not JSON": (_tensors(PQ_TRANSFORMER, _set(f"{LAYER}.quant_state.bitsandbytes__nf4",
                                                           lambda t: t[:5])), "Loading .* failed"),
    "code table": (_tensors(PQ_TRANSFORMER, _set(f"{LAYER}.quant_map", _code)), "code table that is not"),
    "NaN scale": (_tensors(PQ_TRANSFORMER, _set(f"{LAYER}.nested_absmax", _nan)), "NaN or infinite block scales"),
    "T5 absmax cut short": (_tensors(PQ_T5, _set("encoder.block.0.layer.0.SelfAttention.q.weight.absmax",
                                                 lambda t: t[:3])), r"text_encoder_2 tensor .*\.q\.weight\.absmax"),
    "T5 quant state shape": (_blob(PQ_T5, "encoder.block.0.layer.0.SelfAttention.k.weight",
                                   lambda s: s.update(shape=[32, 64])), "text_encoder_2 weight .*k has quant state"),
}


@pytest.mark.parametrize("case", list(PREQUANTIZED_DAMAGE))
def test_damaged_prequantized_weights_are_refused_before_first_use(prequantized, tmp_path, case):
    """Damage to the packed weights or their quantization state is refused while loading, naming the tensor: it
    would otherwise load and then fail in generate, make NaN images, or silently change them."""
    damage, match = PREQUANTIZED_DAMAGE[case]
    folder = copy_checkpoint(prequantized, tmp_path / "ckpt")
    damage(folder)
    with pytest.raises(VortexInitializationError, match=match) as info:
        load_flux_schnell(device="cpu", model=folder)
    assert info.value.remediation


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
@pytest.mark.parametrize("key,value", [("bnb_4bit_compute_dtype", "float16"), ("quant_method", "torchao"),
                                       ("load_in_8bit", True), ("bnb_4bit_quant_type", "fp4"),
                                       ("bnb_4bit_use_double_quant", False), ("bnb_4bit_quant_storage", "float32"),
                                       ("llm_int8_skip_modules", ["proj_out"]), ("llm_int8_threshold", 3.0),
                                       ("an_unknown_key", 1)])
def test_the_preset_is_the_one_source_of_a_prequantized_folder_s_settings(prequantized, tmp_path, component, key,
                                                                          value):
    """What a folder records must match the preset: a T5 computing in float16 under nf4, or a folder that says it
    is torchao or 8-bit, would otherwise load as if nothing were wrong."""
    folder = copy_checkpoint(prequantized, tmp_path / "ckpt")
    _edit_json(f"{component}/config.json", lambda d: d["quantization_config"].update({key: value}))(folder)
    with pytest.raises(VortexInitializationError, match=f"checkpoint's {component} is pre-quantized with "
                                                        f"quantization_config.{key}=") as info:
        load_flux_schnell(device="cpu", model=folder)
    assert isinstance(info.value, ValueError)
