"""The Responses dialect (``POST /v1/responses``, OpenAI's Responses API).

- ``schema``: the request body (``ResponsesRequest``, ``parse_responses_request``);
- ``mapping``: the request as the shared pipeline's ``NeutralRequest`` (``to_neutral``), with
  the flat names of namespaced functions (``ToolName``) and the conversation to store;
- ``store``: finished responses kept in memory for ``previous_response_id`` and
  ``GET``/``DELETE /v1/responses/{id}`` (``ResponseStore``).
"""

from trioserve.api.dialects.responses.mapping import (
    NAMESPACE_SEPARATOR,
    MappedRequest,
    ToolName,
    flat_tool_name,
    to_neutral,
)
from trioserve.api.dialects.responses.schema import ResponsesRequest, parse_responses_request
from trioserve.api.dialects.responses.store import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_ENTRIES,
    ResponseStore,
    StoredResponse,
)

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_ENTRIES",
    "NAMESPACE_SEPARATOR",
    "MappedRequest",
    "ResponseStore",
    "ResponsesRequest",
    "StoredResponse",
    "ToolName",
    "flat_tool_name",
    "parse_responses_request",
    "to_neutral",
]
