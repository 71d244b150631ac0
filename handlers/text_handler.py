"""TorchServe handler for text-classification, multi-label and relation-extraction early-exit models.

Requests: JSON `{"text": ...}` (relation extraction adds `"head"`, `"tail"`) or plain UTF-8 text; an optional
`"epee": {"policy": "full"}` field or `X-EPEE-Policy` header overrides the policy (docs/design.md, "HTTP contract").
"""

from __future__ import annotations

from epee_core import TextService
from handlers.base import EarlyExitHandler


class TextHandler(EarlyExitHandler):
    service_class = TextService
