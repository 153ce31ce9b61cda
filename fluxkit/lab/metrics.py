"""Quality and timing statistics: CLIP score, image fidelity (PSNR, SSIM), percentiles and outliers.

CLIP backbones are open_clip models loaded from the local cache only. When the asked-for weights
are not cached, a seeded random-init ViT-B-32 stands in, and `ClipScorer.real` is False: its figures
then check the plumbing, never image quality.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

log = logging.getLogger("fluxkit")

OUTLIER_MADS = 5.0
# Random weights measure nothing at any size, so the plumbing check runs the smallest common backbone: on a 2-core
# CPU a random ViT-L-14 took 6.2 s to build and 1.3 s an image, a ViT-B-32 1.1 s and 0.1 s.
PLUMBING_CLIP = "ViT-B-32"
PERCENTILES = (50, 90, 99, 99.9)


# ---- statistics ---------------------------------------------------------------------------------------

def summarize(values: list[float] | np.ndarray) -> dict:
    """Median, tails and spread of a sample; outliers are values above median + 5 MAD (scaled MAD)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise InputError("summarize needs at least one value")
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)) * 1.4826)
    limit = median + OUTLIER_MADS * mad
    outliers = [int(i) for i in np.flatnonzero(x > limit)] if mad > 0 else []
    out = {f"p{p:g}".replace(".", "_"): float(np.percentile(x, p)) for p in PERCENTILES}
    out.update(n=int(x.size), mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
               min=float(x.min()), max=float(x.max()), mad=mad, outlier_limit=limit, outliers=outliers)
    return out


# ---- image fidelity -----------------------------------------------------------------------------------

def _nchw(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (1, 3, H, W) float32 on CPU."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"expected an (H, W, 3) image, got shape {tuple(image.shape)}")
    return image.detach().to("cpu", torch.float32).permute(2, 0, 1).unsqueeze(0)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (inf when identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _nchw(image), _nchw(reference)
    if torch.equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_nchw(image), _nchw(reference), data_range=1.0))


def lpips_backbone() -> Path:
    """Where torchvision keeps the AlexNet weights LPIPS builds on (torchmetrics ships LPIPS' own layers)."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]


def load_lpips():
    """LPIPS (AlexNet) as a function of two images, or the reason it is not available: its backbone is read from
    the local cache only (torchvision would download it, and nothing here waits on the network)."""
    path = lpips_backbone()
    if not path.is_file():
        return None, f"not computed: LPIPS needs torchvision's AlexNet weights at {path}, not in the local cache"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()

    def distance(image: torch.Tensor, reference: torch.Tensor) -> float:
        with torch.inference_mode():
            return float(metric(_nchw(image), _nchw(reference)))

    return distance, "LPIPS (AlexNet, torchmetrics), lower is closer"


# ---- CLIP ---------------------------------------------------------------------------------------------

@dataclass
class ClipScorer:
    """An open_clip model with its preprocessing; `real` tells whether pretrained weights were found."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    name: str
    pretrained: str
    real: bool

    @torch.inference_mode()
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        from ..images import to_uint8

        pixels = self.preprocess(Image.fromarray(to_uint8(image))).unsqueeze(0)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)[0]

    @torch.inference_mode()
    def text_features(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer([text])
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]

    def clip_score(self, image: torch.Tensor, text: str) -> float:
        """100 x max(cos, 0) between image and text (the torchmetrics definition)."""
        return self.score(self.image_features(image), text)

    def score(self, features: torch.Tensor, text: str) -> float:
        """`clip_score` of an image whose features are at hand: the image tower is what costs on a CPU, so a caller
        that also compares the image encodes it once."""
        return 100.0 * max(float(features @ self.text_features(text)), 0.0)

    def describe(self) -> str:
        if self.real:
            return f"{self.name}/{self.pretrained} (pretrained weights from the local cache)"
        return (f"{self.name}/{self.pretrained} not in the local cache: a {PLUMBING_CLIP} with seeded random weights "
                "stands in, so CLIP figures are a plumbing check, not a quality measure")


def check_clip_name(name: str, pretrained: str) -> dict:
    """open_clip's config of a backbone and pretrained tag; refuses names it does not know."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise InputError(f"clip model {name}/{pretrained}: unknown to open_clip; see open_clip.list_pretrained()")
    return cfg


def _cached_weights(name: str, pretrained: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cfg = check_clip_name(name, pretrained)
    repo = cfg.get("hf_hub", "").strip("/")
    if not repo:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def load_clip(name: str = "ViT-L-14", pretrained: str = "openai", seed: int = 0) -> ClipScorer:
    """The open_clip backbone from the local cache, or a seeded random-init `PLUMBING_CLIP` in its place."""
    import open_clip

    weights = _cached_weights(name, pretrained)
    if weights is None:
        log.warning("CLIP %s/%s is not in the local cache: a %s with seeded random weights stands in (plumbing "
                    "check only)", name, pretrained, PLUMBING_CLIP)
    architecture = name if weights else PLUMBING_CLIP
    with torch.random.fork_rng(devices=[]):  # the seed is this model's, not the process's random state
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=weights)
    model.eval()
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(architecture), name, pretrained, weights is not None)
