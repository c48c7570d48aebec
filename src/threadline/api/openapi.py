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

from threadline.api.protocols import chats
from threadline.api.schemas import TEXT_PATTERN

# Query parameters whose value is JSON, with the schema of what the server accepts.
_INT64 = 2**63 - 1
JSON_QUERY_PARAMETERS: dict[str, dict[str, Any]] = {
    "metadata": {
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "additionalProperties": {
            "type": ["string", "number", "boolean"],
            "pattern": "^[^\\u0000]*$",
            "minimum": -_INT64,
            "maximum": _INT64,
        },
    }
}
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
        schemas = spec.get("components", {}).get("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        _metadata_without_nul(schemas)
        _agui_input_as_checked(schemas)
        _this_deployment(app, spec)
        app.openapi_schema = spec
    return app.openapi_schema


_NO_NUL = {"pattern": "^[^\\u0000]*$"}
_METADATA_VALUE = {
    "anyOf": [
        {"type": "string", **_NO_NUL},
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": "#/components/schemas/MetadataValue"}},
        {
            "type": "object",
            "propertyNames": _NO_NUL,
            "additionalProperties": {"$ref": "#/components/schemas/MetadataValue"},
        },
    ],
    "description": "Any JSON value without a NUL character in a string or a key (no store "
    "takes one); the whole object is limited by THREADLINE_MAX_METADATA_BYTES.",
}


# Threadline's own request bodies with a `metadata` object (the protocol endpoints' bodies are
# the protocols' own, stored nowhere).
_WITH_METADATA = ("ThreadCreate", "ThreadUpdate", "MessageCreate")


def _metadata_without_nul(schemas: dict[str, Any]) -> None:
    """Metadata objects as the stores accept them: JSON with no NUL in any string or key."""
    schemas["MetadataValue"] = _METADATA_VALUE
    for name in _WITH_METADATA:
        field = schemas.get(name, {}).get("properties", {}).get("metadata")
        if field is None:
            continue
        for option in field.get("anyOf", [field]):
            if option.get("type") == "object":
                option["propertyNames"] = _NO_NUL
                option["additionalProperties"] = {"$ref": "#/components/schemas/MetadataValue"}


def _agui_input_as_checked(schemas: dict[str, Any]) -> None:
    """AG-UI's `RunAgentInput` as `POST /v1/agui/{agent}` checks it. The protocol's published
    schema says less than its validators and this server check:
    - a tagged union is told apart by its tag (a message's `role`, a part's `type`), which
      each member's schema gives a default instead of requiring;
    - the client ids the server stores have no control character (`chats.check_client_id`);
    - a user message, stored as its text, needs some text besides whitespace and no NUL
      (`MessageStore.check`): a string, or parts of which one is such a text part."""
    for schema in schemas.values():
        _require_tags(schema, schemas)
    client_id = {"type": "string", "pattern": chats.CLIENT_ID_PATTERN}
    run_input = schemas.get("RunAgentInput", {}).get("properties", {})
    if "threadId" in run_input:
        run_input["threadId"] = {**run_input["threadId"], **client_id}
    union = run_input.get("messages", {}).get("items", {}).get("discriminator", {})
    for ref in union.get("mapping", {}).values():
        properties = schemas.get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
        if "id" in properties:
            properties["id"] = {**properties["id"], **client_id}
    content = schemas.get("UserMessage", {}).get("properties", {}).get("content", {})
    for option in content.get("anyOf", []):
        if option.get("type") == "string":
            option["pattern"] = TEXT_PATTERN
        elif option.get("type") == "array":
            option["contains"] = _SOME_TEXT_PART
            option["items"] = {"allOf": [option["items"], _TEXT_PART_WITHOUT_NUL]}


_SOME_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string", "pattern": TEXT_PATTERN}},
    "required": ["type", "text"],
}
_TEXT_PART_WITHOUT_NUL = {
    "if": {"properties": {"type": {"const": "text"}}, "required": ["type"]},
    "then": {"properties": {"text": {"type": "string", **_NO_NUL}}},
}


def _require_tags(schema: object, schemas: dict[str, Any]) -> None:
    """Every member of every tagged union under `schema` requires its tag."""
    if isinstance(schema, list):
        for item in schema:
            _require_tags(item, schemas)
    if not isinstance(schema, dict):
        return
    discriminator = schema.get("discriminator")
    if isinstance(discriminator, dict):
        tag = discriminator.get("propertyName")
        for ref in discriminator.get("mapping", {}).values():
            member = schemas.get(ref.rsplit("/", 1)[-1])
            if member is not None and tag not in member.setdefault("required", []):
                member["required"].append(tag)
    for value in schema.values():
        _require_tags(value, schemas)


def _this_deployment(app: FastAPI, spec: dict[str, Any]) -> None:
    """What depends on the running server's configuration: the agents a run may name and the
    longest message. (Known once the lifespan has started, as it has when a client asks.)"""
    runtime = getattr(app.state, "runtime", None)
    if runtime is None:
        return
    names = sorted(info.name for info in runtime.registry.describe())
    schemas = spec.get("components", {}).get("schemas", {})
    for schema in schemas.values():
        field = schema.get("properties", {}).get("agent")
        if field is not None and schema.get("title", "").endswith(("Create", "Request")):
            _name_agents(field, names)
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "agent" and "schema" in parameter:
                    _name_agents(parameter["schema"], names)
    content = schemas.get("MessageCreate", {}).get("properties", {}).get("content")
    if content is not None:
        content["maxLength"] = runtime.settings.max_message_chars
    agui_content = schemas.get("UserMessage", {}).get("properties", {}).get("content", {})
    for option in agui_content.get("anyOf", []):
        if option.get("type") == "string":
            option["maxLength"] = runtime.settings.max_message_chars


def _name_agents(schema: dict[str, Any], names: list[str]) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option["enum"] = names
            option.pop("maxLength", None)
            option.pop("minLength", None)


def _complete(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    parameters = operation.get("parameters", [])
    for parameter in parameters:
        name = parameter.get("name")
        if parameter.get("in") == "query" and name in JSON_QUERY_PARAMETERS:
            description = parameter.pop("schema", {}).get("description")
            schema = JSON_QUERY_PARAMETERS[name]
            parameter["content"] = {"application/json": {"schema": schema}}
            parameter.setdefault("description", description or "A JSON object")
        elif "schema" in parameter:
            # `str | None = None` is "may be left out", not "may be null": a query string or
            # a header cannot carry a JSON null.
            parameter["schema"] = _without_null(parameter["schema"])
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


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if not options:
        return schema
    kept = [option for option in options if option.get("type") != "null"]
    if len(kept) != 1:
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**kept[0], **rest}


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
