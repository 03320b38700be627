"""The request-options contract: what a caller may ask of a cut-out, written once.

``CutoutOptions`` is the compose stage's record (defaults are rembg's). The routes'
models extend it: ``RemoveQuery`` is ``POST /remove``'s query string (the long
names), ``RembgForm`` is rembg's ``POST /api/remove`` form (its short names
``a/af/ab/ae/om/ppm/dc/bgc``, as aliases of the same fields). FastAPI validates
and documents the query from ``RemoveQuery``; the client, the CLI and bulk mode
take their fields from it too. Imports pydantic only: no Ray, no rembg, no Pillow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

OutputFormat = Literal["png", "webp"]
# exact: rembg's pixels; fast: the mask upscaled at less cost, the same colour
# formula (deployments/fast.py), the alpha within a measured gate.
Fidelity = Literal["exact", "fast"]
RGBA = tuple[int, int, int, int]

# rembg's spellings of a boolean; an empty value (a blank form field) is false.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off", ""})


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"must be a boolean (true/false), got {value!r}")
    return value


def _color(value: Any) -> Any:
    """``R,G,B,A`` (rembg's form; ``R,G,B`` means opaque) or ``#RRGGBB[AA]``; blank is none."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        # FastAPI reads a tuple-typed query parameter as a list of its values.
        value = value[0]
    if value is None or isinstance(value, tuple | list):
        parts = list(value) if value is not None else None
    else:
        text = str(value).strip()
        if not text:
            return None
        try:
            if text.startswith("#") and len(text) in (7, 9):
                parts = [int(text[i : i + 2], 16) for i in range(1, len(text), 2)]
            else:
                parts = [int(p) for p in text.split(",")]
        except ValueError:
            parts = []
    if parts is None:
        return None
    if len(parts) == 3:
        parts.append(255)
    if len(parts) != 4 or not all(isinstance(p, int) and 0 <= p <= 255 for p in parts):
        raise ValueError(f"must be 'R,G,B,A' with values 0-255 or '#RRGGBBAA', got {value!r}")
    return tuple(parts)


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


Flag = Annotated[bool, BeforeValidator(_flag)]
Byte = Annotated[int, Field(ge=0, le=255)]
Color = Annotated[
    RGBA | None,
    BeforeValidator(_color),
    PlainSerializer(lambda c: None if c is None else ",".join(map(str, c)), return_type=str | None),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(\d{1,3},\d{1,3},\d{1,3}(,\d{1,3})?|#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?)$",
        }
    ),
]
ModelName = Annotated[str | None, BeforeValidator(_blank_is_none)]


class CutoutOptions(BaseModel):
    """What the compose stage does with the mask; defaults are rembg's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha_matting: Flag = Field(default=False, description="Refine the edges with alpha matting")
    alpha_matting_foreground_threshold: Byte = Field(
        default=240, description="Alpha matting: mask values above this are foreground"
    )
    alpha_matting_background_threshold: Byte = Field(
        default=10, description="Alpha matting: mask values below this are background"
    )
    alpha_matting_erode_size: int = Field(
        default=10, ge=0, le=100, description="Alpha matting: erode structure size"
    )
    only_mask: Flag = Field(default=False, description="Return the mask, not the cut-out")
    post_process_mask: Flag = Field(
        default=False, description="Smooth the mask (rembg's post_process)"
    )
    decontaminate: Flag = Field(default=False, description="Decontaminate the edge colours")
    bgcolor: Color = Field(
        default=None, description="Background colour: R,G,B,A (0-255) or #RRGGBBAA"
    )

    @property
    def plain(self) -> bool:
        """The default cut-out: no refinement, post-processing, mask-only or colour."""
        return not (
            self.alpha_matting
            or self.decontaminate
            or self.post_process_mask
            or self.only_mask
            or self.bgcolor is not None
        )

    def cutout(self) -> CutoutOptions:
        """Only the compose record, without a route's routing or encoding fields."""
        return CutoutOptions.model_construct(
            **{name: getattr(self, name) for name in CutoutOptions.model_fields}
        )


OptionsT = TypeVar("OptionsT", bound=CutoutOptions)


class RemoveQuery(CutoutOptions):
    """``POST /remove``'s query string: a model to route to, the cut-out, the format."""

    model: ModelName = Field(default=None, description="A served model (default: the service's)")
    format: OutputFormat = Field(default="png", description="png (lossless) or webp")
    fidelity: Fidelity | None = Field(
        default=None,
        description="exact (rembg's pixels) or fast (the mask upscaled BICUBIC: the alpha"
        " within a fraction of a grey level, the same colours); default: the service's",
    )

    def query_params(self) -> dict[str, str]:
        """What differs from the defaults, as query parameters (short URLs)."""
        values = self.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
        return {
            name: ("true" if v else "false") if isinstance(v, bool) else str(v)
            for name, v in values.items()
        }


# rembg's own field names for the options its server takes.
REMBG_NAMES = {
    "alpha_matting": "a",
    "alpha_matting_foreground_threshold": "af",
    "alpha_matting_background_threshold": "ab",
    "alpha_matting_erode_size": "ae",
    "only_mask": "om",
    "post_process_mask": "ppm",
    "decontaminate": "dc",
    "bgcolor": "bgc",
}


class RembgForm(CutoutOptions):
    """rembg's ``POST /api/remove`` form fields (and its ``bgc`` query parameter).

    rembg's ``extras`` (JSON for its session factory, model paths included) is
    refused: no server-side path is ever taken from a request. ``vm`` (ViTMatte
    refinement) is accepted only when false.
    """

    model_config = ConfigDict(alias_generator=lambda name: REMBG_NAMES.get(name, name))

    model: ModelName = Field(default=None, description="A served model (default: the service's)")

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "extras" in data:
            raise ValueError("extras is not supported by this server")
        if "vm" in data:
            if _flag(data["vm"]):
                raise ValueError("vm (ViTMatte refinement) is not supported by this server")
            data = {k: v for k, v in data.items() if k != "vm"}
        return data


def field_names(model: type[BaseModel]) -> list[str]:
    """The names a caller uses for ``model``'s fields (aliases where it has them)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def describe(errors: Sequence[Mapping[str, Any]], accepted: Sequence[str]) -> str:
    """One message for a list of pydantic (or FastAPI) errors, naming each parameter."""
    unknown = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"]
    parts = []
    if unknown:
        parts.append(
            f"unknown parameter(s) {', '.join(sorted(unknown))}; accepted: {', '.join(accepted)}"
        )
    for error in errors:
        if error["type"] == "extra_forbidden":
            continue
        # FastAPI's locations start with where the value was ("query", "body").
        loc = [str(p) for p in error.get("loc", ()) if p not in ("query", "body", "form")]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] != "value_error" and "input" in error:
            message += f", got {error['input']!r}"
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts)


class OptionsError(ValueError):
    """Options that do not validate; the message names each bad parameter."""


def parse(model: type[OptionsT], values: Mapping[str, str]) -> OptionsT:
    """``values`` validated as ``model``; an ``OptionsError`` names what is wrong."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise OptionsError(describe(exc.errors(), field_names(model))) from None
