"""What the OpenAPI document says beyond what FastAPI infers, so that it describes what the
server does (generated clients and schemathesis' conformance checks rely on it), plus the
interactive docs served offline and the `Allow` header of every path.

- Every error body is `ErrorOut` (`{"error": {"code", "message"}}`), 422 included (FastAPI
  documents its own `HTTPValidationError`, which this server never sends).
- An authenticated operation documents 401; one that takes a body documents 400 (invalid JSON
  or Unicode), 413 (too large) and 415 (not JSON); one with query parameters documents 400
  (a lone surrogate in a JSON value).
- A query parameter whose value is JSON (`metadata`) is described as `content:
  application/json` with an object schema, OpenAPI's way of saying "a JSON-serialized object".
- `OPTIONS` on any path answers 204 with `Allow` (CORS preflights aside, which the CORS
  middleware answers first), and a 405 names every method of the path in `Allow`.
- `/docs` is Swagger UI from the `swagger-ui-bundle-v2` package's files, served by this
  server: it works offline and loads nothing from another host. (The `swagger-ui-bundle`
  package still ships Swagger UI 4, which cannot render OpenAPI 3.1, FastAPI's version.)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

JSON_QUERY_PARAMETERS = frozenset({"metadata"})
_ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
_ERROR_RESPONSES = {
    "400": "The body is not valid JSON, or a string in it or in a JSON query value holds a "
    "lone UTF-16 surrogate (`invalid_json`, `invalid_unicode`)",
    "401": "No token, or one that is invalid, expired, revoked or of an account that no "
    "longer exists (`not_authenticated`, `token_invalid`, `token_expired`, `token_revoked`, "
    "`token_user_not_found`)",
    "413": "The body is larger than THREADLINE_MAX_REQUEST_BYTES (`payload_too_large`)",
    "415": "A body sent without `Content-Type: application/json` (`unsupported_media_type`)",
    "422": "A parameter or a field of the body is invalid (`validation_error` or a more "
    "specific code)",
}
_DOCS_ASSETS = "/docs/assets"


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The document, built once and cached on the app (FastAPI's convention)."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        for item in spec.get("paths", {}).values():
            for operation in item.values():
                _complete(operation)
        spec.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        spec.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = spec
    return app.openapi_schema


def _complete(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    parameters = operation.get("parameters", [])
    for parameter in parameters:
        if parameter.get("in") == "query" and parameter.get("name") in JSON_QUERY_PARAMETERS:
            description = parameter.pop("schema", {}).get("description")
            parameter["content"] = {"application/json": {"schema": {"type": "object"}}}
            parameter.setdefault("description", description or "A JSON object")
    wanted = []
    if operation.get("security"):
        wanted.append("401")
    if "requestBody" in operation:
        wanted += ["400", "413", "415", "422"]
    if any(p.get("in") == "query" for p in parameters):
        wanted += ["400", "422"]
    if parameters:
        wanted.append("422")
    for status in wanted:
        responses.setdefault(status, {"description": _ERROR_RESPONSES[status]})
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            response["content"] = {"application/json": {"schema": _ERROR_REF}}
            if status in _ERROR_RESPONSES:
                response["description"] = _ERROR_RESPONSES[status]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(routes: list[BaseRoute], path: str) -> list[str]:
    """Every method some route answers at `path`, plus OPTIONS; [] for an unknown path.
    Asked through the routes' own matching (included routers nest their routes)."""
    methods = set()
    for method in _METHODS:
        scope = {"type": "http", "path": path, "method": method, "root_path": ""}
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            methods.add(method)
    if not methods:
        return []
    return sorted(methods | {"OPTIONS"})


class OptionsMiddleware:
    """`OPTIONS` outside CORS: 204 with the path's `Allow` header (404 for an unknown path)."""

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        methods = allowed_methods(self.routes, scope["path"])
        if not methods:
            await self.app(scope, receive, send)
            return
        await Response(status_code=204, headers={"Allow": ", ".join(methods)})(scope, receive, send)


def install_docs(app: FastAPI) -> None:
    """`/docs` from local assets; `/openapi.json` through `build_openapi`."""
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    app.mount(_DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    async def docs(_request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_DOCS_ASSETS}/favicon-32x32.png",
        )

    app.add_route("/docs", docs, include_in_schema=False)
