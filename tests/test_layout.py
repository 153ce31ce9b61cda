"""The runtime a host imports (`fluxkit`, `fluxkit.quantizers`) never imports the lab (`fluxkit.lab`) nor the
CLI: a host that installs the core wheel never needs what the lab needs."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fluxkit"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_runtime_never_imports_the_lab_or_the_cli():
    runtime = [p for p in PACKAGE.rglob("*.py") if p.parent.name not in ("lab", "cli")]
    assert len(runtime) > 20
    for path in runtime:
        for module in _imports(path):
            assert not any(part in ("lab", "cli") for part in module.lstrip(".").split(".")), (path.name, module)
