"""How a model replica runs its session: providers, threads and the GPU memory cap.

``use_gpu_for`` picks the GPU or the CPU path from the settings' ``device`` and
the cluster (for the service and bulk mode alike); ``runtime_for`` turns what Ray
assigned a replica (CPUs, GPU ids, GPU fraction) into a ``RuntimeConfig``;
``providers_for`` turns that into ONNX Runtime's execution providers, the CUDA
arena capped at the replica's fraction of the card.
Nothing here needs a GPU, Ray, pydantic or rembg to import.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class RuntimeConfig:
    """How a replica runs its session; derived from what Ray assigned it."""

    use_gpu: bool = False
    device_id: int = 0
    intra_op_threads: int = 1
    # Bytes of GPU memory this session's arena may take: its GPU fraction of the card.
    gpu_mem_limit: int | None = None
    # EXHAUSTIVE times every cuDNN algorithm once per new input shape and keeps
    # the fastest; HEURISTIC guesses with no timing, DEFAULT takes the first that
    # fits. The search costs seconds per shape, but on the GPU every run is
    # padded to a bucketed shape and __init__ warms each of them, so it is paid
    # once, before the replica reports ready, and each later run gets the best
    # kernel. Its workspace comes out of the capped arena, so an algorithm that
    # does not fit in this replica's share is simply not chosen.
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    # Spinning intra-op threads burn the cores that decode/encode need.
    allow_spinning: bool = False
    # Opt-in: float16 weights and arithmetic inside, float32 IO (GPU only: the
    # CPU provider has few float16 kernels and runs such a model slowly).
    fp16: bool = False
    # Opt-in: rembg's normalisation as nodes in front of the model, so that the
    # replica feeds the uint8 images as they are (a quarter of the bytes to copy
    # to the device, and no float64 numpy work on the replica's CPU).
    preprocess_in_graph: bool = False


def use_gpu_for(device: str, cluster_gpus: float) -> bool:
    """``auto`` takes the GPU path exactly when the cluster has GPUs.

    A cluster that autoscales GPU nodes from zero shows none until one is up:
    set ``device: gpu`` there, so that replicas ask for GPUs and nodes come.
    """
    if device == "gpu":
        return True
    if device == "cpu":
        return False
    return cluster_gpus > 0


def providers_for(config: RuntimeConfig) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers in preference order: CUDA first only with a GPU."""
    if not config.use_gpu:
        return [CPU]
    cuda: dict[str, Any] = {
        "device_id": config.device_id,
        # Grow the arena by what is asked, not by doubling: replicas share a card.
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        "do_copy_in_default_stream": True,
    }
    if config.gpu_mem_limit is not None:
        cuda["gpu_mem_limit"] = config.gpu_mem_limit
    return [(CUDA, cuda), CPU]


def gpu_mem_limit_bytes(fraction: float, total_bytes: int, headroom: float = 0.9) -> int:
    """The arena limit for a replica holding ``fraction`` of a card of ``total_bytes``.

    ``headroom`` leaves room for what ORT does not count against ``gpu_mem_limit``:
    the CUDA context and the cuDNN and cuBLAS handles (cuDNN's convolution
    workspaces are scratch buffers taken from the arena, so they are counted).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"GPU fraction must be in (0, 1], got {fraction}")
    return int(total_bytes * fraction * headroom)


def gpu_total_memory(device: int | str) -> int | None:
    """The card's memory in bytes, or None when it cannot be read.

    ``device`` is what Ray reports in ``ray.get_gpu_ids()``: an index, or a
    GPU UUID when CUDA_VISIBLE_DEVICES holds UUIDs. NVML (nvidia-ml-py) is asked
    first; ``nvidia-smi`` is the fallback where the binding is not installed.
    """
    total = _nvml_total(device)
    return total if total is not None else _smi_total(device)


def _nvml_total(device: int | str) -> int | None:
    def total(pynvml: Any, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)

    return nvml_read(device, total)


def nvml_read(device: int | str, read: Callable[[Any, Any], T]) -> T | None:
    """``read(pynvml, handle)`` for ``device`` as Ray reports it (an index or a
    UUID), NVML initialised around it; None where nvidia-ml-py is not installed
    or NVML fails (no driver, no such card)."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return read(pynvml, _nvml_handle(pynvml, device))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        logger.info("NVML could not read GPU %s: %s", device, exc)
        return None


def _nvml_handle(pynvml: Any, device: int | str) -> Any:
    if isinstance(device, str) and not device.isdigit():
        return pynvml.nvmlDeviceGetHandleByUUID(device)
    # NVML counts in PCI bus order and CUDA fastest-first (ties, in practice, in
    # bus order): they agree on nodes of one GPU model, the usual case; a node of
    # mixed cards needs CUDA_DEVICE_ORDER=PCI_BUS_ID for them to agree.
    return pynvml.nvmlDeviceGetHandleByIndex(int(device))


def _smi_total(device: int | str) -> int | None:
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--id={device}",
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 1024 * 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def runtime_for(
    cpus: float,
    gpu_ids: Sequence[int | str],
    num_gpus: float,
    *,
    fp16: bool = False,
    preprocess_in_graph: bool = False,
    total_memory: Callable[[int | str], int | None] = gpu_total_memory,
) -> RuntimeConfig:
    """A replica's runtime from what Ray assigned it.

    The GPU path is taken only when Ray gave the replica a GPU and a fraction
    was asked for. The arena limit is that fraction of the card (less headroom);
    when the card's memory cannot be read the arena is left uncapped and a
    warning says so, since replicas sharing the card may then starve each other.
    """
    use_gpu = bool(gpu_ids) and num_gpus > 0
    limit = None
    if use_gpu:
        total = total_memory(gpu_ids[0])
        if total:
            limit = gpu_mem_limit_bytes(num_gpus, total)
        else:
            logger.warning("GPU memory unknown (install nvidia-ml-py): the CUDA arena is uncapped")
    return RuntimeConfig(
        use_gpu=use_gpu,
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned card: it is device 0 here.
        device_id=0,
        intra_op_threads=max(1, math.ceil(cpus)),
        gpu_mem_limit=limit,
        fp16=fp16 and use_gpu,
        preprocess_in_graph=preprocess_in_graph,
    )
