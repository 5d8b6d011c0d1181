"""What `make setup` must leave behind: vLLM importable beside torch+cpu, no CUDA-only torch add-ons."""

import importlib.metadata
import subprocess
import sys

import pytest


def test_vllm_imports_in_a_fresh_interpreter():
    code = "import vllm, ray.serve.llm; print(vllm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.29.0"


@pytest.mark.parametrize("dist", ["torchvision", "torchaudio", "torchcodec"])
def test_cuda_only_torch_addons_are_not_installed(dist):
    # PyPI's builds of these break `import vllm` beside torch+cpu ("torchvision::nms does not exist").
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version(dist)


def test_bloomray_registers_its_vllm_plugin():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in plugins if ep.name == "bloomray"]
    assert [ep.value for ep in ours] == ["bloomray.serving.vllm_plugin:register"]
    from bloomray.serving.vllm_plugin import register

    assert ours[0].load() is register  # the installed entry point is this checkout's function
