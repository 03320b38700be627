"""What a pool replica's budget counts: host memory on a CPU replica, its memory on
the card on a GPU replica, and host memory again where NVML cannot read the card.

There is no GPU here: the card is a FAKE (``FakeCard``, NVML's readings as the
replica would see them), and so are the GPU runtime and the session in the one
test that runs a GPU replica's loads. The fallback where NVML cannot be read is
tested for real, on a machine where it cannot.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from deployments import pool_server
from deployments.infer import WarmupReport
from deployments.memory import DeviceMemory, DeviceReading, HostMemory, read_device_memory
from deployments.model_server import Resources
from deployments.pool_server import PoolServer, pool_memory
from deployments.runtime import RuntimeConfig
from deployments.settings import PoolConfig

SERVER: Any = PoolServer.func_or_class  # type: ignore[attr-defined]
MB = 1_000_000
# The replica's share of the card: its CUDA arena limit.
SHARE = 1000 * MB
GPU = RuntimeConfig(use_gpu=True, gpu_mem_limit=SHARE)


@dataclass
class FakeCard:
    """FAKE NVML (no GPU here): a card's memory in use, by this process and others.

    NVML lists this process once it has a CUDA context, unless ``listed`` is
    False (a container with its own pid namespace); ``readable`` False is NVML
    failing."""

    others: int = 3000 * MB
    mine: int = 0
    context: bool = False
    listed: bool = True
    readable: bool = True
    devices: list[int | str] = field(default_factory=list)

    def read(self, device: int | str) -> DeviceReading | None:
        self.devices.append(device)
        if not self.readable:
            return None
        process = self.mine if self.context and self.listed else None
        return DeviceReading(process, self.others + self.mine)

    def allocate(self, n: int) -> None:
        self.context = True
        self.mine += n


def pool(**extra: Any) -> PoolConfig:
    return PoolConfig.model_validate(
        {"models": [{"name": "u2netp"}], "budget_bytes": 2500 * MB, **extra}
    )


def hold(held: list[npt.NDArray[np.float64]], n: int) -> int:
    """Allocate and touch ``n`` bytes of host memory, kept in ``held``."""
    held.append(np.ones(n // 8))
    return len(held)


@pytest.mark.parametrize(
    ("listed", "others_meanwhile"),
    [
        # NVML lists the process: its own growth, whatever others allocate meanwhile.
        (True, 400 * MB),
        # Not listed (own pid namespace): the card's growth, this process alone loading.
        (False, 0),
    ],
)
def test_a_load_is_charged_its_growth_on_the_card(listed: bool, others_meanwhile: int) -> None:
    card = FakeCard(listed=listed)
    meter = DeviceMemory("1", card.read)

    def load(n: int) -> str:
        card.allocate(n)
        card.others += others_meanwhile
        return f"model of {n}"

    # The first load also creates the context: not listed before it, listed after.
    assert meter.charge(lambda: load(700 * MB)) == ("model of 700000000", 700 * MB)
    assert meter.charge(lambda: load(300 * MB)) == ("model of 300000000", 300 * MB)
    assert card.devices == ["1"] * 4  # the replica's card, before and after each load


def test_an_unreadable_card_charges_host_growth_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    meter = DeviceMemory("0", FakeCard(readable=False).read)
    held: list[npt.NDArray[np.float64]] = []
    with caplog.at_level(logging.WARNING):
        for n in (1, 2):
            value, charged = meter.charge(lambda: hold(held, 64 * MB))
            assert value == n
            assert charged >= 48 * MB  # host memory it took (RSS), give or take
    assert caplog.text.count("could not be read (NVML)") == 1


@pytest.mark.parametrize(
    ("runtime", "extra", "kind", "budget", "arena"),
    [
        # A CPU replica: host memory, budget_bytes; no arena on a card.
        (RuntimeConfig(), {"gpu_budget_bytes": 500 * MB}, "host", 2500 * MB, None),
        # A GPU replica: its share of the card by default, every session within it.
        (GPU, {}, "device", SHARE, SHARE),
        # A smaller device budget: the sessions' arenas within it too.
        (GPU, {"gpu_budget_bytes": 600 * MB}, "device", 600 * MB, 600 * MB),
        # A larger one is kept (with a warning), the arenas within the share.
        (GPU, {"gpu_budget_bytes": 4000 * MB}, "device", 4000 * MB, SHARE),
        # The card's size unknown: budget_bytes, on the card.
        (RuntimeConfig(use_gpu=True), {}, "device", 2500 * MB, 2500 * MB),
    ],
)
def test_the_budget_counts_the_memory_the_replica_runs_on(
    runtime: RuntimeConfig, extra: dict[str, Any], kind: str, budget: int, arena: int | None
) -> None:
    memory = pool_memory(pool(**extra), runtime, DeviceMemory("0", FakeCard().read))
    assert memory.meter.kind == kind
    assert (memory.budget_bytes, memory.arena_bytes) == (budget, arena)


def test_a_gpu_replica_whose_card_nvml_cannot_read_counts_host_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        memory = pool_memory(
            pool(gpu_budget_bytes=600 * MB), GPU, DeviceMemory("0", FakeCard(readable=False).read)
        )
    assert isinstance(memory.meter, HostMemory)
    assert (memory.budget_bytes, memory.arena_bytes) == (2500 * MB, 600 * MB)
    assert "charged host memory (RSS) against budget_bytes" in caplog.text


def test_a_gpu_pool_replica_evicts_by_its_memory_on_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ``PoolServer`` and ``ModelPool``; FAKE: the card, the GPU runtime
    Ray's GPU would give and the session (each takes 600 MB on the card)."""
    card = FakeCard()
    sessions: list[RuntimeConfig] = []

    class FakeSession:
        def __init__(self, path: Path, spec: Any, runtime: RuntimeConfig, batch: int) -> None:
            sessions.append(runtime)
            self.report = WarmupReport()
            card.allocate(600 * MB)

    monkeypatch.setattr(pool_server, "runtime_for", lambda cpus, gpu_ids, num_gpus: GPU)
    monkeypatch.setattr(pool_server, "DeviceMemory", lambda device: DeviceMemory(device, card.read))
    monkeypatch.setattr(pool_server, "OnnxModel", FakeSession)
    models = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"weights")
        models.append({"name": name, "model": "u2netp", "path": str(tmp_path / name)})
    server = SERVER(
        {"models": models, "budget_bytes": 5000 * MB},
        0.25,
        resources=Resources(cpus=1, gpu_ids=("2",)),
    )

    async def scenario() -> dict[str, Any]:
        await server.pool.ensure("a")
        await server.pool.ensure("b")  # 2 x 600 MB do not fit the 1000 MB share
        info: dict[str, Any] = await server.info()
        return info

    info = asyncio.run(scenario())
    assert info["budget_memory"] == "device" and info["budget_bytes"] == SHARE
    assert info["loaded"] == ["b"] and info["used_bytes"] == 600 * MB
    assert [m["measured_bytes"] for m in info["models"]] == [600 * MB, 600 * MB]
    assert [m["evictions"] for m in info["models"]] == [1, 0]
    assert [r.gpu_mem_limit for r in sessions] == [SHARE, SHARE]
    assert set(card.devices) == {"2"}  # the card Ray gave the replica


def nvml_reads_a_gpu() -> bool:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:
        return False
    return True


@pytest.mark.skipif(nvml_reads_a_gpu(), reason="NVML reads a GPU on this machine")
def test_without_nvml_a_gpu_pool_replica_counts_host_memory_for_real(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No fake: NVML (nvidia-ml-py) is installed, and finds no driver here."""
    assert read_device_memory("0") is None
    with caplog.at_level(logging.WARNING):
        # What Ray gives a GPU replica: a card's id and a fraction.
        server = SERVER(pool(), 0.5, resources=Resources(cpus=1, gpu_ids=("0",)))
    assert server.runtime.use_gpu
    info = asyncio.run(server.info())
    assert info["budget_memory"] == "host" and info["budget_bytes"] == 2500 * MB
    assert "charged host memory (RSS) against budget_bytes" in caplog.text
    # The real reading falls back to host memory too, load by load.
    held: list[npt.NDArray[np.float64]] = []
    value, charged = DeviceMemory("0").charge(lambda: hold(held, 64 * MB))
    assert value == 1 and charged >= 48 * MB
