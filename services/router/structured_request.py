"""The OpenAI and vLLM spellings of an output constraint, to one ``StructuredOutputs``.

A request may constrain its output through ``response_format`` (OpenAI: ``json_object``, or
``json_schema`` with ``name``, ``schema`` and ``strict``), vLLM's ``structured_outputs``, its
older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` extras, or
(chat) a ``tool_choice`` that forces a call. At most one may be set: two are a 400 naming both,
never one silently preferred. Every constraint is checked before the request is routed: a JSON
schema against its metaschema, then (where the engine's grammar module is present) by
compiling it, so an invalid one is a 400 naming the field that carried it.
"""

import json
from typing import Any

from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import SamplingParams, StructuredOutputs

GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
"""vLLM's older extras, by the ``StructuredOutputs`` option each sets."""


def from_response_format(response_format: Any) -> StructuredOutputs | None:
    """``response_format`` (a ``ResponseFormat`` body) as a constraint; None for ``text``.

    Raises:
        InvalidRequest: naming ``response_format``.
    """
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputs(json_object=True)
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise InvalidRequest(
            'response_format of type "json_schema" needs json_schema.schema',
            param="response_format",
        )
    schema = spec.json_schema
    check_json_schema(schema, "response_format.json_schema.schema", "response_format")
    return _checked(StructuredOutputs(json=schema), "response_format")


def from_guided(name: str, value: Any) -> StructuredOutputs:
    """One ``guided_*`` extra as a constraint.

    Raises:
        InvalidRequest: naming the field.
    """
    option = GUIDED_FIELDS[name]
    if option == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise InvalidRequest(f"{name} is not JSON", param=name) from None
        check_json_schema(value, name, name)
    try:
        constraint = StructuredOutputs(**{option: value})
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=name) from None
    return _checked(constraint, name)


def from_structured_outputs(value: dict[str, Any]) -> StructuredOutputs:
    """vLLM's ``structured_outputs`` body field (a JSON schema in ``json`` may be an object).

    Raises:
        InvalidRequest: naming ``structured_outputs`` (or one of its options).
    """
    # SamplingParams converts and checks the mapping exactly as the gRPC door does.
    constraint = SamplingParams(structured_outputs=value).structured_outputs
    if constraint.json is not None:
        param = "structured_outputs.json"
        try:
            schema = json.loads(constraint.json)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"{param} is not JSON", param=param) from None
        check_json_schema(schema, param, param)
    return _checked(constraint, f"structured_outputs.{constraint.kind}")


def check_json_schema(schema: object, where: str, param: str) -> None:
    """A JSON schema's own validity (against its metaschema).

    Raises:
        InvalidRequest: naming ``param``.
    """
    import jsonschema

    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON schema object", param=param)
    if not isinstance(schema.get("$defs", {}), dict):
        raise InvalidRequest(f"{where}: $defs must be an object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(
            f"{where} is not a valid JSON schema: {exc.message}", param=param
        ) from None
    except Exception as exc:  # noqa: BLE001 - the checker choking on what the client sent
        # (a "$schema" that is no string, a schema nested deeper than it recurses) is no
        # server fault
        raise InvalidRequest(
            f"{where} is not a valid JSON schema ({type(exc).__name__})", param=param
        ) from None


def _checked(constraint: StructuredOutputs, param: str) -> StructuredOutputs:
    check_grammar(constraint, param)
    return constraint


def check_grammar(constraint: StructuredOutputs, param: str) -> None:
    """Compile the constraint with the engine's grammar backend, if present
    (``tandem.api.structured_grammar.check_structured_outputs``).

    Raises:
        InvalidRequest: the grammar backend refuses it; naming ``param``.
    """
    try:
        from tandem.api.structured_grammar import check_structured_outputs
    except ImportError:  # the grammar backend is not installed: the schema checks stand
        return
    check_structured_outputs(constraint, param=param)


def only_one(names: list[str]) -> None:
    """Refuse a request whose output several fields constrain.

    Raises:
        InvalidRequest: naming them (``param``: the last).
    """
    if len(names) > 1:
        raise InvalidRequest(
            f"{' and '.join(names)} each constrain the output; set only one of them",
            param=names[-1],
        )
