"""Matting, decontamination and post_process_mask against rembg's own result.

Within ``refine``'s limits (matting 1 MP, decontamination 4 MP) the service's
cut-out is documented as rembg's, pixel for pixel: compared here with
``rembg.remove(data, session=new_session("u2netp"), <option>=True)``, in process
(the stages the ingress runs) and once through the real server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FIXTURES, Service, assert_parity
from deployments.bench.harness import rembg_home
from deployments.infer import OnnxModel
from deployments.options import CutoutOptions
from deployments.pipeline import remove

CAR, CLOTH, ANIME = (FIXTURES / f"{n}-1.jpg" for n in ("car", "cloth", "anime-girl"))


@pytest.fixture(scope="module")
def rembg_remove(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """rembg.remove with rembg's u2netp session on the embedded model file."""
    home = rembg_home(tmp_path_factory.mktemp("rembg"))
    old = os.environ.get("REMBG_HOME")
    os.environ["REMBG_HOME"] = str(home)
    try:
        from rembg import new_session, remove

        session = new_session("u2netp", providers=["CPUExecutionProvider"])
        yield lambda data, **options: bytes(remove(data, session=session, **options))
    finally:
        if old is None:
            os.environ.pop("REMBG_HOME", None)
        else:
            os.environ["REMBG_HOME"] = old


CASES = [
    (CAR, {"alpha_matting": True}),
    (CAR, {"alpha_matting": True, "alpha_matting_erode_size": 3, "post_process_mask": True}),
    (CAR, {"decontaminate": True}),
    (CLOTH, {"decontaminate": True}),
    (CLOTH, {"post_process_mask": True}),
    (ANIME, {"post_process_mask": True, "only_mask": True}),
]


@pytest.mark.parametrize(
    ("path", "options"),
    CASES,
    ids=[f"{p.stem}-{'-'.join(o)}" for p, o in CASES],
)
def test_refined_cutout_is_rembgs(
    u2netp: OnnxModel, rembg_remove: Any, path: Path, options: dict[str, Any]
) -> None:
    data = path.read_bytes()
    ours = remove(data, u2netp, CutoutOptions(**options)).body
    assert_parity(f"{path.stem}-{'-'.join(options)}", ours, rembg_remove(data, **options))


@pytest.mark.e2e
def test_served_matting_is_rembgs(service: Service, rembg_remove: Any) -> None:
    data = CAR.read_bytes()
    with service.client(timeout=300) as client:
        response = client.post(
            "/remove", params={"alpha_matting": "true", "post_process_mask": "true"}, content=data
        )
    assert response.status_code == 200, response.text
    reference = rembg_remove(data, alpha_matting=True, post_process_mask=True)
    assert_parity("served-car-matting", response.content, reference)
