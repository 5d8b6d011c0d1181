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


def test_deepspeed_ops_build_into_one_cache_per_environment(tmp_path):
    """bloomray points torch's extension cache at a dir of this environment's own (two venvs on
    one home would rebuild each other's DeepSpeed ops on every switch); a user's value wins;
    DeepSpeed's op builder uses the dir."""
    import hashlib
    import os

    code = (
        "import os, bloomray; from torch.utils.cpp_extension import _get_build_directory as d; "
        "print(os.environ['TORCH_EXTENSIONS_DIR']); print(d('cpu_adam', False))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    ours, build = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert ours.endswith(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]) and build.startswith(ours)
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    users = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert users.stdout.split()[0] == str(tmp_path)
