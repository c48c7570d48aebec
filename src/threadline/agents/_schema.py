"""Turn a function's signature and docstring into a pydantic arguments model and JSON schema.

The model validates what the LLM sends; its JSON schema is what the LLM is shown. Fields are
stored under `arg_<name>` with the parameter's name as alias, so a parameter called `json`,
`schema` or `model_config` cannot collide with `BaseModel`'s own attributes.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.errors import PydanticInvalidForJsonSchema, PydanticSchemaGenerationError

from threadline.agents.context import RunContext
from threadline.agents.errors import ToolDefinitionError
from threadline.llm.types import JSONObject

_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Returns?|Yields?|"
    r"Raises|Examples?|Notes?|Attributes|See Also|Warnings?|Todo|References)\s*:\s*$",
    re.IGNORECASE,
)
_ARG_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
_ARG_ENTRY = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    field: str
    positional_only: bool


@dataclass(frozen=True, slots=True)
class ToolSignature:
    """How to validate arguments for a function and call it with them."""

    description: str
    parameters: JSONObject
    model: type[BaseModel]
    params: tuple[_Param, ...]
    takes_context: bool

    def bind(
        self, arguments: Mapping[str, object], ctx: object
    ) -> tuple[list[object], dict[str, object]]:
        """Validate `arguments`; raise `pydantic.ValidationError` if they do not fit."""
        validated = self.model.model_validate(dict(arguments))
        args: list[object] = [ctx] if self.takes_context else []
        kwargs: dict[str, object] = {}
        for param in self.params:
            value = getattr(validated, param.field)
            if param.positional_only:
                args.append(value)
            else:
                kwargs[param.name] = value
        return args, kwargs


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its description and per-argument descriptions."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    arguments: dict[str, str] = {}
    index = 0
    while index < len(lines) and not _SECTION.match(lines[index].strip()):
        description.append(lines[index])
        index += 1
    while index < len(lines):
        header = lines[index].strip().rstrip(":").strip().lower()
        index, entries = _read_section(lines, index + 1)
        if header in _ARG_SECTIONS:
            arguments.update(entries)
    return "\n".join(description).strip(), arguments


def _read_section(lines: list[str], index: int) -> tuple[int, dict[str, str]]:
    """Read an indented section body from `index`; return where it ends and its entries."""
    entries: dict[str, str] = {}
    current: str | None = None
    entry_indent: int | None = None
    while index < len(lines):
        line = lines[index]
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent == 0:
            break  # the next section header
        index += 1
        if not line.strip():
            continue
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ARG_ENTRY.match(line.strip())
        if indent <= entry_indent and match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return index, entries


def build_signature(
    function: Callable[..., object], *, tool_name: str, description: str | None
) -> ToolSignature:
    """Inspect `function`; raise `ToolDefinitionError` for anything a model could not call."""
    try:
        hints = typing.get_type_hints(function, include_extras=True)
        parameters = list(inspect.signature(function).parameters.values())
    except (NameError, TypeError, ValueError) as exc:
        raise ToolDefinitionError(f"cannot read its signature: {exc}", tool_name=tool_name) from exc
    doc_description, arg_docs = parse_docstring(inspect.getdoc(function))
    takes_context = bool(parameters) and _is_context(hints.get(parameters[0].name))
    if takes_context:
        if parameters[0].kind is inspect.Parameter.KEYWORD_ONLY:
            raise ToolDefinitionError(
                "RunContext must be a positional parameter", tool_name=tool_name
            )
        parameters = parameters[1:]
    fields, params = _fields(parameters, hints, arg_docs, tool_name)
    model, schema = _make_model(tool_name, fields)
    return ToolSignature(
        description=doc_description if description is None else description,
        parameters=schema,
        model=model,
        params=params,
        takes_context=takes_context,
    )


def _fields(
    parameters: list[inspect.Parameter],
    hints: Mapping[str, object],
    arg_docs: Mapping[str, str],
    tool_name: str,
) -> tuple[dict[str, tuple[object, object]], tuple[_Param, ...]]:
    """Model fields for the parameters, and how to pass each back to the function."""
    fields: dict[str, tuple[object, object]] = {}
    params: list[_Param] = []
    for parameter in parameters:
        annotation = _check_parameter(parameter, hints, tool_name)
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        field_name = f"arg_{parameter.name}"
        fields[field_name] = (
            annotation,
            Field(default, alias=parameter.name, description=arg_docs.get(parameter.name)),
        )
        positional_only = parameter.kind is inspect.Parameter.POSITIONAL_ONLY
        params.append(_Param(parameter.name, field_name, positional_only))
    return fields, tuple(params)


def _is_context(annotation: object) -> bool:
    return annotation is RunContext or typing.get_origin(annotation) is RunContext


def _check_parameter(
    parameter: inspect.Parameter, hints: Mapping[str, object], tool_name: str
) -> object:
    if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        raise ToolDefinitionError(
            f"parameter {parameter.name!r}: *args and **kwargs cannot be described to a model",
            tool_name=tool_name,
        )
    if parameter.name not in hints:
        raise ToolDefinitionError(
            f"parameter {parameter.name!r} needs a type annotation", tool_name=tool_name
        )
    annotation = hints[parameter.name]
    if _is_context(annotation):
        raise ToolDefinitionError(
            f"parameter {parameter.name!r}: RunContext must be the first parameter",
            tool_name=tool_name,
        )
    return annotation


def _make_model(
    tool_name: str, fields: Mapping[str, tuple[object, object]]
) -> tuple[type[BaseModel], JSONObject]:
    # Unknown arguments are refused rather than ignored: the model learns it misspelled one.
    config = ConfigDict(extra="forbid")
    try:
        model: type[BaseModel] = create_model(  # type: ignore[call-overload]
            f"{tool_name}_arguments", __config__=config, **fields
        )
        schema: JSONObject = model.model_json_schema()
    except (PydanticSchemaGenerationError, PydanticInvalidForJsonSchema) as exc:
        raise ToolDefinitionError(
            f"a parameter type has no JSON schema: {exc}", tool_name=tool_name
        ) from exc
    schema.pop("title", None)  # the tool's name already says it
    return model, schema
