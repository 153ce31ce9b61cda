import bitsandbytes as bnb
import torch

from fluxkit.config import QuantizationSpec
from fluxkit.loading import quantize_linear_layers
from fluxkit.memory import CPU_NOTE, device_snapshot, module_weight_bytes, track_phase


def test_nf4_bytes_are_packed_data_plus_quant_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256, bias=False))
    quantize_linear_layers(model, QuantizationSpec("bitsandbytes_4bit", "nf4", components=("transformer",)), torch.float32)
    assert isinstance(model[0], bnb.nn.Linear4bit)
    # 128*256 weights at 4 bits, one float32 absmax per 64 weights, the 16-entry float32 NF4 code
    assert module_weight_bytes(model) == 128 * 256 // 2 + (128 * 256 // 64) * 4 + 16 * 4


def test_int8_bytes_are_data_plus_row_scales():
    model = torch.nn.Sequential(torch.nn.Linear(128, 256, bias=True))
    quantize_linear_layers(model, QuantizationSpec("bitsandbytes_8bit", components=("transformer",)), torch.float32)
    assert module_weight_bytes(model) == 128 * 256 + 256 * 4 + 256 * 4  # int8 data, float32 SCB, float32 bias


def test_cpu_has_no_device_statistics():
    snap = device_snapshot(torch.device("cpu"))
    assert snap == {"available": False, "note": CPU_NOTE}
    records = []
    with track_phase(torch.device("cpu"), "denoise", records):
        pass
    assert records[0].phase == "denoise" and records[0].peak_gib is None
