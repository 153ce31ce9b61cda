import math

import numpy as np
import pytest
import torch

from fluxkit.lab.metrics import load_clip, load_lpips, psnr, ssim, summarize


def test_percentiles_on_known_data():
    s = summarize(list(range(1, 101)))  # 1..100
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["p99_9"] == pytest.approx(99.901)
    assert s["mean"] == pytest.approx(50.5) and s["n"] == 100
    assert s["outliers"] == []


def test_outliers_above_median_plus_5_mad():
    values = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 3.0]
    s = summarize(values)
    mad = np.median(np.abs(np.array(values) - 1.0)) * 1.4826
    assert s["outlier_limit"] == pytest.approx(1.0 + 5 * mad)
    assert s["outliers"] == [7]
    assert summarize([2.0] * 10)["outliers"] == []  # zero spread: nothing is an outlier
    with pytest.raises(ValueError):
        summarize([])


def test_psnr_ssim_on_known_pairs():
    a = torch.full((64, 64, 3), 0.5)
    assert psnr(a, a) == math.inf
    assert psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 10*log10(1/0.01)
    assert ssim(a, a) == pytest.approx(1.0)
    rng = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 64, 3, generator=rng)
    assert ssim(noise, 1 - noise) < 0.0  # anti-correlated structure
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


@pytest.fixture(scope="module")
def clip():
    return load_clip("ViT-B-32", "openai")


def test_clip_says_what_it_is(clip):
    if clip.real:
        assert "pretrained weights from the local cache" in clip.describe()
    else:
        assert "plumbing check" in clip.describe()
    image = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(1))
    features = clip.image_features(image)
    assert float(features @ features) == pytest.approx(1.0, abs=1e-5)  # unit length: a dot product is the cosine


class _FixedFeatures(torch.nn.Module):
    """Stands in for a CLIP backbone with known embeddings, to check the score's definition."""

    def __init__(self, image, text):
        super().__init__()
        self.image, self.text = torch.tensor([image]), torch.tensor([text])

    def encode_image(self, pixels):
        return self.image

    def encode_text(self, tokens):
        return self.text


@pytest.mark.parametrize("image,text,expected", [
    ([1.0, 0.0], [1.0, 0.0], 100.0),
    ([3.0, 4.0], [4.0, 3.0], 96.0),  # cos = 24 / 25
    ([1.0, 0.0], [-1.0, 0.0], 0.0),  # negative cosine clips to 0
])
def test_clip_score_is_100_times_the_clipped_cosine(image, text, expected):
    from fluxkit.lab.metrics import ClipScorer

    scorer = ClipScorer(_FixedFeatures(image, text), lambda img: torch.zeros(3, 4, 4), lambda texts: None, "fixed",
                        "none", real=False)
    assert scorer.clip_score(torch.zeros(4, 4, 3), "anything") == pytest.approx(expected)


def test_clip_is_seeded(clip):
    again = load_clip("ViT-B-32", "openai")
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(clip.image_features(image), again.image_features(image))


def test_unknown_clip_is_refused():
    with pytest.raises(ValueError, match="unknown to open_clip"):
        load_clip("ViT-B-32", "no-such-tag")


def test_lpips_reads_its_backbone_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    distance, note = load_lpips()
    assert distance is None and str(tmp_path / "checkpoints") in note and "not in the local cache" in note


def test_lpips_when_its_backbone_is_cached():
    distance, note = load_lpips()
    if distance is None:
        pytest.skip(note)
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert distance(image, image) < 1e-6 < distance(image, 1 - image)
