"""Synthetic FLUX.1-schnell checkpoints: the real diffusers folder layout with seeded random weights.

No machine here can download the real weights, so fluxkit writes its own. `full` has the exact
FLUX.1-schnell component configs (memory and speed on a GPU are the same as for trained weights);
`tiny` has the same classes at widths that run on a CPU in well under a second. Both load through
the same `load_flux_schnell` path as the real checkpoint. Images made from them mean nothing.

Each tensor is drawn from its own generator, seeded from (seed, component, tensor name), and
written shard by shard from a model built on the meta device, so the full checkpoint (33 GB in
bf16) is never held in host memory, and the same seed always gives the same bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .cache import cache_root, derived
from .checks import require_extra
from .errors import InputError, VortexInitializationError

MARKER_FILE = "fluxkit_synthetic.json"
MAX_SHARD_BYTES = 5 * 10**9

# Component configs. `full` is FLUX.1-schnell's (black-forest-labs/flux src/flux/util.py and the diffusers
# configs of the Hub repository); `tiny` keeps every quantizable Linear's input width a multiple of 64
# (bitsandbytes 4-bit on CPU needs it).
TRANSFORMER = {
    "full": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=False, axes_dims_rope=[16, 56, 56]),
    "tiny": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
                 guidance_embeds=False, axes_dims_rope=[8, 12, 12]),
}
T5 = {
    "full": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128),
    "tiny": dict(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=1, vocab_size=1100),
}
T5_COMMON = dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dense_act_fn="gelu_new",
                 is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                 tie_word_embeddings=False, architectures=["T5EncoderModel"])
CLIP = {
    "full": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, projection_dim=64),
}
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
                   eos_token_id=2, pad_token_id=1, architectures=["CLIPTextModel"])
VAE = {
    "full": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=8),
}
VAE_COMMON = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, act_fn="silu", sample_size=1024,
                  scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                  force_upcast=True)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
PRESETS = tuple(TRANSFORMER)


def default_cache_dir() -> Path:
    return cache_root() / "synthetic"


def read_marker(folder: str | Path) -> dict | None:
    """The synthetic marker of a checkpoint folder, or None for a real checkpoint."""
    path = Path(folder) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VortexInitializationError(f"{path} is not a valid fluxkit marker ({err}).",
                                        remediation="rebuild the folder with `fluxkit synth`") from None
    if not isinstance(marker, dict):
        raise VortexInitializationError(f"{path} is not a valid fluxkit marker.",
                                        remediation="rebuild the folder with `fluxkit synth`")
    return marker


def ensure_synthetic(preset: str = "tiny", seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The cached synthetic checkpoint for (preset, seed), built on first use and checked on every use (rebuilt
    when a file of it is damaged)."""
    folder = Path(cache_dir or default_cache_dir()) / f"{preset}-seed{seed}"
    return derived(folder, lambda out: write_synthetic(out, preset=preset, seed=seed), verify_synthetic,
                   "the cached synthetic checkpoint")


def verify_synthetic(folder: Path) -> None:
    """Raises unless `folder` is a complete synthetic checkpoint whose weight files are whole (headers only)."""
    from .checkpoint import read_safetensors_header

    marker = read_marker(folder)
    if not (marker and marker.get("complete")):
        raise ValueError("its marker is missing or incomplete")
    for path in sorted(folder.glob("*/*.safetensors")):
        read_safetensors_header(path)


def write_synthetic(out: str | Path, preset: str = "tiny", seed: int = 0, device: str | None = None,
                    progress: bool = False) -> Path:
    """Write a complete FLUX.1-schnell diffusers folder with seeded random weights.

    The folder is built beside `out` and renamed into place, so a reader never sees half of one.
    `device` is where random numbers are drawn (default: CUDA for `full` when present, else CPU);
    it is recorded in the marker because CPU and CUDA generators draw different numbers.
    """
    if preset not in PRESETS:
        raise InputError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}")
    # the stand-in T5 tokenizer is trained with sentencepiece; CLIP's vocabulary is the file open_clip ships
    require_extra("a synthetic checkpoint", "synthetic", "sentencepiece", "google.protobuf", "open_clip")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r}: must be a non-negative integer")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not read_marker(out):
        raise InputError(f"out={out}: exists and is not a synthetic checkpoint; choose a new or empty folder")
    if device is None:
        device = "cuda" if preset == "full" and torch.cuda.is_available() else "cpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write_all(tmp, preset, seed, device, progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _write_all(root: Path, preset: str, seed: int, device: str, progress: bool) -> None:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    (root / "model_index.json").write_text(
        json.dumps({**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, indent=2, sort_keys=True) + "\n")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(root / "scheduler")
    _write_clip_tokenizer(root / "tokenizer")
    _write_t5_tokenizer(root / "tokenizer_2")

    for name, build, library in _builders(preset):
        with torch.device("meta"):
            model = build()
        folder = root / name
        if library == "diffusers":
            model.save_config(folder)
        else:
            model.config.dtype = torch.bfloat16
            model.config.save_pretrained(folder)
        _write_weights(model, folder, library, f"{seed}/{name}", device, progress)
        del model
    marker = {"synthetic": True, "preset": preset, "seed": seed, "generator_device": torch.device(device).type,
              "weights": "seeded random; memory and speed only, never image quality", "complete": True}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _builders(preset: str) -> list[tuple[str, object, str]]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return [
        ("transformer", lambda: FluxTransformer2DModel(**TRANSFORMER[preset]), "diffusers"),
        ("text_encoder_2", lambda: T5EncoderModel(T5Config(**T5_COMMON, **T5[preset])), "transformers"),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **CLIP[preset])), "transformers"),
        ("vae", lambda: AutoencoderKL(**VAE_COMMON, **VAE[preset]), "diffusers"),
    ]


def meta_model(preset: str = "full") -> dict[str, torch.nn.Module]:
    """The components of a synthetic preset on the meta device; `full` is FLUX.1-schnell's exact shapes."""
    with torch.device("meta"):
        return {name: build() for name, build, _ in _builders(preset)}


def _tensor_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def _random_tensor(name: str, shape: torch.Size, key: str, device: str) -> torch.Tensor:
    """Scaled normal weights (std 1/sqrt(fan_in)) keep activations finite; norms 1, biases 0."""
    if len(shape) >= 2:
        g = torch.Generator(device).manual_seed(_tensor_seed(key))
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(fan_in**-0.5)
    elif name.endswith("weight"):
        t = torch.ones(shape, device=device)
    else:
        t = torch.zeros(shape, device=device)
    return t.to(torch.bfloat16).cpu()


def _write_weights(model: torch.nn.Module, folder: Path, library: str, key: str, device: str, progress: bool) -> None:
    base = "diffusion_pytorch_model" if library == "diffusers" else "model"
    persistent = {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)}
    entries = [(n, p.shape) for n, p in model.named_parameters()]
    entries += [(n, b.shape) for n, b in model.named_buffers() if n in persistent]
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    files = [f"{base}.safetensors"] if len(shards) == 1 else [
        f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = _progress(sum(len(s) for s in shards), folder.name) if progress else None
    for filename, shard in zip(files, shards):
        tensors = {}
        for name, shape in shard:
            tensors[name] = _random_tensor(name, shape, f"{key}/{name}", device)
            if bar:
                bar.update(1)
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        del tensors
    if bar:
        bar.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for _, s in entries)},
                 "weight_map": {n: f for f, shard in zip(files, shards) for n, _ in shard}}
        (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _non_persistent(model: torch.nn.Module, buffer_name: str) -> set[str]:
    owner = model.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else model
    return owner._non_persistent_buffers_set


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"synth {desc}", unit="tensor")


def _write_clip_tokenizer(folder: Path) -> None:
    """The real CLIP BPE vocabulary, from the file open_clip ships: merges are its lines [1:48895]."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")
        tokenizer.save_pretrained(folder)


def _write_t5_tokenizer(folder: Path) -> None:
    """A small unigram sentencepiece model standing in for T5's (no package ships spiece.model)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    words = _corpus_words()
    sentences = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spiece")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=prefix, model_type="unigram", vocab_size=1000,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
        tokenizer = T5TokenizerFast.from_pretrained(tmp, model_max_length=512, legacy=True)
        tokenizer.save_pretrained(folder)


def _corpus_words() -> list[str]:
    """Whole English words from the CLIP BPE merges: a fixed, offline corpus for sentencepiece."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:20000]
    words = ["".join(m.split())[:-4] for m in merges if m.endswith("</w>")]
    return [w for w in words if w.isalpha() and w.isascii()]
