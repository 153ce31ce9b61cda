"""JupyterLab serves the notebooks with the `fluxkit` kernel, and that kernel starts (`make lab`)."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TOKEN = "fluxkit-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from fluxkit.lab.validate import ensure_kernel

    ensure_kernel()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={NOTEBOOKS}",
                             "--ServerApp.disable_check_xsrf=True", "--allow-root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "JUPYTER_RUNTIME_DIR": str(tmp_path_factory.mktemp("rt"))})
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _api(base: str, path: str, method: str = "GET", body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}{path}?token={TOKEN}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def test_lab_offers_the_fluxkit_kernel_for_every_notebook(lab):
    specs = _api(lab, "/api/kernelspecs")["kernelspecs"]
    assert "fluxkit" in specs
    assert Path(specs["fluxkit"]["spec"]["argv"][0]).resolve() == Path(sys.executable).resolve()
    listed = {c["name"] for c in _api(lab, "/api/contents")["content"]}
    for notebook in NOTEBOOKS.glob("*.ipynb"):
        assert notebook.name in listed
        assert _api(lab, f"/api/contents/{notebook.name}")["content"]["metadata"]["kernelspec"]["name"] == "fluxkit"


def test_the_fluxkit_kernel_runs_fluxkit():
    """The kernel Lab offers imports this checkout's fluxkit (papermill and nbval run the notebooks on it)."""
    from jupyter_client.manager import start_new_kernel

    from fluxkit.lab.validate import ensure_kernel

    manager, client = start_new_kernel(kernel_name=ensure_kernel())
    try:
        reply = client.execute_interactive("import fluxkit, sys; print(fluxkit.__file__, sys.executable)", timeout=120)
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
