"""nbval settings for the notebooks run as tests (`make test`)."""
from __future__ import annotations

# nbval waits a fixed 5 s for a cell's last kernel messages once the cell has finished. On a loaded 2-core CI
# machine, after a cell that loaded a dozen models, they came later (04_quantization_tradeoffs, cell 1: "Timeout of
# 5 seconds exceeded waiting for output", while the same cell passes alone in 2 minutes). A slow machine is not a
# failing notebook; a cell that hangs is still caught by --nbval-cell-timeout.
OUTPUT_TIMEOUT_S = 120


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's notebook cells
            item.output_timeout = OUTPUT_TIMEOUT_S
