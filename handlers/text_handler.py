"""TorchServe handler for text-classification, multi-label and relation-extraction early-exit models.

Requests: JSON `{"text": ...}` (relation extraction adds `"head"`, `"tail"`) or plain UTF-8 text; an optional
`"epee": {"policy": "full"}` field or `X-EPEE-Policy` header overrides the policy (docs/design.md, "HTTP contract").
Open Inference Protocol bodies (`POST /v2/models/{name}/infer`, n rows per request) are answered in that form
(docs/oip.md).
"""

from __future__ import annotations

from epee_core import TextService
from handlers.base import EarlyExitHandler


class TextHandler(EarlyExitHandler):
    service_class = TextService
