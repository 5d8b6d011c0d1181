"""Throughput, FLOPs and MFU math, and the rank-0 metric sinks (console, TensorBoard, MLflow)."""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from bloomray.model.build import count_parameters

log = logging.getLogger(__name__)


def flops_per_token(
    n_matmul_params: int, n_layer: int, hidden: int, seq_len: int, trainable_ratio: float = 1.0
) -> float:
    """Training FLOPs per token: forward 2N + backward 4N (PaLM appendix B), plus attention.

    ``n_matmul_params`` counts weights used in matmuls (the LM head included, embeddings
    lookups excluded). With frozen weights (LoRA) the weight-gradient half of the backward
    is skipped for them, so backward costs ``2N + 2N*trainable_ratio``.
    """
    attn = 12 * n_layer * hidden * seq_len
    return (2 + 2 + 2 * trainable_ratio) * n_matmul_params + attn


def matmul_params(model: torch.nn.Module, vocab_size: int, hidden: int, lm_head: bool) -> int:
    """Parameters that take part in matmuls (embedding lookup excluded, tied head added)."""
    total = count_parameters(model)
    emb = vocab_size * hidden
    return total - emb + (emb if lm_head else 0)


# Datasheet dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched against
# torch.cuda.get_device_name() in order (more specific names first). MFU on GPU is reported
# against these, so it means what MFU means in papers and other frameworks.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def datasheet_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 datasheet peak for a CUDA device name, or None if it is not in the table."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def peak_flops(configured_tflops: float | None, dtype: torch.dtype, device: torch.device) -> float:
    """Per-worker FLOP/s that MFU is measured against.

    ``scaling.peak_tflops`` when set; on a GPU the datasheet dense bf16 peak of the device;
    on CPU (no datasheet number applies) a matmul measured now, under the run's core sharing,
    in the run's dtype or fp32, whichever is faster: a CPU without bf16 units (AVX2) emulates
    bf16 GEMMs far below its fp32 rate, and some bf16 shapes take faster kernels than the
    measured one, so the bf16 matmul alone is no ceiling there (MFU came out above 1).
    """
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = datasheet_peak_tflops(name)
        if tflops is not None:
            return tflops * 1e12
        log.warning("no datasheet peak for %r: MFU uses a measured matmul; set scaling.peak_tflops", name)
        return measure_peak_flops(dtype, device)
    rates = [measure_peak_flops(d, device) for d in dict.fromkeys((dtype, torch.float32))]
    return max(rates)


def measure_peak_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """Sustained matmul FLOP/s of this worker in ``dtype``: the MFU denominator.

    Measured in the same run (and under the same CPU sharing) as the training it judges.
    """
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run prints inf instead of overflowing."""
    return math.exp(loss) if loss < 50 else float("inf")


def format_progress(step: int, total: int, m: dict[str, Any]) -> str:
    """One readable console line per log step."""
    parts = [f"step {step}/{total}", f"loss {m['train_loss']:.4f}"]
    if "eval_loss" in m:
        parts.append(f"eval {m['eval_loss']:.4f}")
    if "eval_perplexity" in m:
        parts.append(f"ppl {m['eval_perplexity']:.1f}")
    if "eval_accuracy" in m:
        parts.append(f"acc {m['eval_accuracy']:.3f} f1 {m['eval_macro_f1']:.3f}")
    parts += [f"{m['tokens_per_s']:,.0f} tok/s", f"MFU {100 * m['mfu']:.2f}%", f"lr {m['lr']:.2e}"]
    if m.get("grad_norm") is not None:
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    if "sparsity" in m:
        parts.append(f"sparsity {m['sparsity']:.3f}")
    return " | ".join(parts)


class MetricSinks:
    """TensorBoard + MLflow on rank 0; both optional, neither allowed to kill training."""

    def __init__(
        self,
        log_dir: Path,
        tracking_uri: str | None,
        tensorboard: bool,
        run_name: str,
        params: dict[str, Any],
    ) -> None:
        self.tb = None
        self.mlflow = None
        log_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        try:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri or f"sqlite:///{log_dir / 'mlflow.db'}")
            mlflow.set_experiment("bloomray")
            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in params.items()})
            self.mlflow = mlflow
        except Exception as exc:  # noqa: BLE001 - tracking must not stop training
            log.warning("MLflow disabled: %s", exc)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
