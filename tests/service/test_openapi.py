"""The OpenAPI document at /openapi.json against what the running service really does.

For a set of real requests (successes and each kind of error): the status is
documented for the operation, the content type is one it lists, JSON bodies and
the documented headers validate against their schemas (JSON Schema 2020-12, as
OpenAPI 3.1 uses), and every parameter and form field sent is one it documents.
Conversely every documented parameter, sent with its documented default, is
accepted. Checked with jsonschema (a Ray dependency): no extra test dependency.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from conftest import Service, gradient, image_bytes

pytestmark = pytest.mark.e2e

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def doc(service: Service) -> Doc:
    with service.client() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: Doc = response.json()
    assert document["openapi"].startswith("3.1")
    return document


def _inline(doc: Doc, node: Any) -> Any:
    """The schema with every local ``$ref`` ("#/components/...") replaced by its target."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            return _inline(doc, target)
        return {key: _inline(doc, value) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(doc, item) for item in node]
    return node


def _validator(doc: Doc, schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(_inline(doc, schema))


def _operation(doc: Doc, method: str, path: str) -> dict[str, Any]:
    assert path in doc["paths"], f"{path} is not documented"
    assert method in doc["paths"][path], f"{method.upper()} {path} is not documented"
    operation: dict[str, Any] = doc["paths"][path][method]
    return operation


def _media_type(value: str) -> str:
    return value.split(";")[0].strip().lower()


def _matching(content: dict[str, Any], media_type: str) -> dict[str, Any] | None:
    """The documented entry for ``media_type``; ``image/*`` style keys match too."""
    for key, entry in content.items():
        if fnmatch.fnmatch(media_type, key.lower()):
            found: dict[str, Any] = entry
            return found
    return None


def check_request(doc: Doc, request: httpx.Request, form: dict[str, str] | None) -> None:
    operation = _operation(doc, request.method.lower(), request.url.path)
    documented = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
    for name in request.url.params:
        assert name in documented, f"query parameter {name} is not documented"
    body = operation.get("requestBody")
    if body is None:
        return
    sent = _media_type(request.headers.get("content-type", ""))
    entry = _matching(body["content"], sent)
    assert entry is not None, f"{sent} is not a documented request body type"
    if form is not None:
        properties = entry["schema"].get("properties", {})
        for name in form:
            assert name in properties, f"form field {name} is not documented"


def check_response(doc: Doc, response: httpx.Response) -> None:
    """The response conforms to the operation's documented response."""
    request = response.request
    operation = _operation(doc, request.method.lower(), request.url.path)
    responses = operation["responses"]
    status = str(response.status_code)
    assert status in responses or "default" in responses, (
        f"{request.method} {request.url.path}: status {status} is not documented "
        f"(documented: {sorted(responses)})"
    )
    documented = responses.get(status, responses.get("default"))
    media_type = _media_type(response.headers.get("content-type", ""))
    content = documented.get("content", {})
    entry = _matching(content, media_type)
    assert entry is not None, f"{request.url.path} {status}: {media_type} not in {list(content)}"
    if media_type == "application/json":
        _validator(doc, entry.get("schema", {})).validate(response.json())
    for name, header in documented.get("headers", {}).items():
        assert name.lower() in response.headers, f"documented header {name} missing"
        value: Any = response.headers[name]
        if header["schema"].get("type") == "integer":
            assert value.isdigit(), f"{name}: {value!r} is not an integer"
            value = int(value)
        _validator(doc, header["schema"]).validate(value)


PNG = image_bytes(gradient())

# (method, path, httpx keyword arguments, form fields sent or None, expected status)
CASES: list[tuple[str, str, dict[str, Any], dict[str, str] | None, int]] = [
    ("post", "/remove", {"content": PNG, "headers": {"Content-Type": "image/png"}}, None, 200),
    (
        "post",
        "/remove",
        {
            "content": PNG,
            "params": {"format": "webp", "only_mask": "true"},
            "headers": {"Content-Type": "application/octet-stream"},
        },
        None,
        200,
    ),
    ("post", "/remove", {"files": {"file": ("g.png", PNG, "image/png")}}, {"file": ""}, 200),
    (
        "post",
        "/api/remove",
        {"files": {"file": ("g.png", PNG, "image/png")}, "data": {"om": "true", "model": "u2netp"}},
        {"file": "", "om": "", "model": ""},
        200,
    ),
    (
        "post",
        "/api/remove",
        {"files": {"file": ("g.png", PNG, "image/png")}, "params": {"bgc": "255,0,0,255"}},
        {"file": ""},
        200,
    ),
    (
        "post",
        "/remove",
        {"content": b"not an image", "headers": {"Content-Type": "image/png"}},
        None,
        415,
    ),
    (
        "post",
        "/remove",
        {"content": PNG, "params": {"model": "nope"}, "headers": {"Content-Type": "image/png"}},
        None,
        404,
    ),
    (
        "post",
        "/remove",
        {
            "content": PNG,
            "params": {"only_mask": "maybe"},
            "headers": {"Content-Type": "image/png"},
        },
        None,
        400,
    ),
    (
        "post",
        "/remove",
        {
            "content": PNG,
            "params": {"alpha_matting_erode_size": "1000"},
            "headers": {"Content-Type": "image/png"},
        },
        None,
        400,
    ),
    ("post", "/api/remove", {"files": {"other": ("g.png", PNG, "image/png")}}, None, 400),
    ("get", "/healthz", {}, None, 200),
    ("get", "/models", {}, None, 200),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "form", "status"),
    CASES,
    ids=[f"{m.upper()} {p} {s}" for m, p, _, _, s in CASES],
)
def test_real_responses_match_the_document(
    service: Service,
    doc: Doc,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    form: dict[str, str] | None,
    status: int,
) -> None:
    with service.client() as client:
        response = client.request(method.upper(), path, **kwargs)
    assert response.status_code == status, response.text
    check_request(doc, response.request, form)
    check_response(doc, response)


def _default(schema: dict[str, Any]) -> str | None:
    if "default" not in schema:
        return None
    value = schema["default"]
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def test_every_documented_parameter_is_accepted(service: Service, doc: Doc) -> None:
    query = _operation(doc, "post", "/remove")["parameters"]
    params = {p["name"]: d for p in query if (d := _default(p["schema"])) is not None}
    # Every option has a documented default, except model, bgcolor and fidelity (none
    # by default: the service's own).
    assert set(params) | {"model", "bgcolor", "fidelity"} == {p["name"] for p in query}
    params |= {"model": "u2netp", "bgcolor": "#00ff00ff", "fidelity": "fast"}
    with service.client() as client:
        response = client.post("/remove", params=params, content=PNG)
        check_response(doc, response)
        assert response.status_code == 200, response.text

        form_schema = _operation(doc, "post", "/api/remove")["requestBody"]["content"][
            "multipart/form-data"
        ]["schema"]
        fields = {
            name: d
            for name, schema in form_schema["properties"].items()
            if (d := _default(schema)) is not None
        } | {"model": "u2netp"}
        rembg = client.post("/api/remove", data=fields, files={"file": ("g.png", PNG, "image/png")})
        check_response(doc, rembg)
        assert rembg.status_code == 200, rembg.text


def test_schemas_in_the_document_are_valid_json_schema(doc: Doc) -> None:
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                Draft202012Validator.check_schema(parameter["schema"])
            for status, response in operation["responses"].items():
                for entry in response.get("content", {}).values():
                    Draft202012Validator.check_schema(entry.get("schema", {}))
                assert response.get("description"), f"{method} {path} {status}"


def test_no_docs_page_that_needs_the_internet(service: Service) -> None:
    # FastAPI's Swagger UI page loads its scripts from a CDN; the service needs
    # no internet, so it serves the document only.
    with service.client() as client:
        page = client.get("/docs")
        index = client.get("/")
    assert page.status_code == 404 and page.json()["error"]["code"] == "not_found"
    assert 'href="/openapi.json"' in index.text and "/docs" not in index.text
