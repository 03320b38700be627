"""The OpenAPI description of the image endpoints.

The endpoints read their bodies themselves (to enforce byte limits while
streaming), so FastAPI cannot infer the request schemas: they are stated here
and attached with ``openapi_extra``.
"""

from __future__ import annotations

from typing import Any

ERROR = {
    "description": "A JSON error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    }
                },
            }
        }
    },
}

_IMAGE_HEADERS = {
    name: {"schema": {"type": "integer" if name != "X-Model" else "string"}}
    for name in ("X-Width", "X-Height", "X-Model")
}

_ERRORS: dict[str, Any] = {str(status): ERROR for status in (400, 401, 404, 413, 415, 500, 503)}


def _image_response(media_types: list[str]) -> dict[str, Any]:
    return {
        "description": "The cut-out (or the mask with only_mask)",
        "headers": _IMAGE_HEADERS,
        "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in media_types},
    }


def _flag(description: str) -> dict[str, Any]:
    return {"type": "boolean", "default": False, "description": description}


def _byte(default: int, description: str) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 0,
        "maximum": 255,
        "default": default,
        "description": description,
    }


_COLOR = {
    "type": "string",
    "pattern": r"^(\d{1,3},\d{1,3},\d{1,3}(,\d{1,3})?|#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?)$",
    "description": "Background colour: R,G,B,A (0-255) or #RRGGBBAA",
}
_ERODE = {
    "type": "integer",
    "minimum": 0,
    "maximum": 100,
    "default": 10,
    "description": "Alpha matting erode structure size",
}


def rembg_remove() -> dict[str, Any]:
    """``POST /api/remove``: rembg's multipart form."""
    return {
        "parameters": [{"name": "bgc", "in": "query", "required": False, "schema": _COLOR}],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "model": {"type": "string", "description": "A served model"},
                            "a": _flag("Alpha matting"),
                            "af": _byte(240, "Alpha matting foreground threshold"),
                            "ab": _byte(10, "Alpha matting background threshold"),
                            "ae": _ERODE,
                            "om": _flag("Only the mask"),
                            "ppm": _flag("Post-process the mask"),
                            "dc": _flag("Decontaminate edge colours"),
                        },
                    }
                }
            },
        },
        "responses": {"200": _image_response(["image/png"]), **_ERRORS},
    }


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def query_remove() -> dict[str, Any]:
    """``POST /remove``: the image as the raw body (or multipart ``file``)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "parameters": [
            _query("model", {"type": "string"}),
            _query("only_mask", _flag("Only the mask")),
            _query("bgcolor", _COLOR),
            _query("alpha_matting", _flag("Alpha matting")),
            _query("alpha_matting_foreground_threshold", _byte(240, "Foreground threshold")),
            _query("alpha_matting_background_threshold", _byte(10, "Background threshold")),
            _query("alpha_matting_erode_size", _ERODE),
            _query("post_process_mask", _flag("Post-process the mask")),
            _query("decontaminate", _flag("Decontaminate edge colours")),
            _query("format", {"type": "string", "enum": ["png", "webp"], "default": "png"}),
        ],
        "requestBody": {
            "required": True,
            "content": {
                "image/*": binary,
                "application/octet-stream": binary,
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
            },
        },
        "responses": {"200": _image_response(["image/png", "image/webp"]), **_ERRORS},
    }
