"""The Messages dialect (``POST /v1/messages``, Anthropic's Messages API).

- ``schema``: the request body (``MessagesRequest``, ``parse_messages_request``);
- ``mapping``: the request as the shared pipeline's ``NeutralRequest`` (``to_neutral``);
- ``errors``: errors in Anthropic's shape and with its statuses (``anthropic_error_body``,
  ``anthropic_status``, ``stream_error_body`` for an ``error`` event);
- ``render``: the neutral piece stream as Anthropic's events and ``message`` object;
- ``endpoint``: ``/v1/messages`` and ``/v1/messages/count_tokens``.
"""

from trioserve.api.dialects.messages.errors import (
    anthropic_error_body,
    anthropic_error_type,
    anthropic_status,
    stream_error_body,
)
from trioserve.api.dialects.messages.mapping import MappedMessages, to_neutral
from trioserve.api.dialects.messages.schema import MessagesRequest, parse_messages_request

__all__ = [
    "MappedMessages",
    "MessagesRequest",
    "anthropic_error_body",
    "anthropic_error_type",
    "anthropic_status",
    "parse_messages_request",
    "stream_error_body",
    "to_neutral",
]
