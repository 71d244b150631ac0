"""TorchServe handler for image-classification early-exit models.

Requests: raw PNG/JPEG bytes (any content type but JSON) or JSON `{"image": "<base64>"}`; an optional
`"epee": {"policy": "full"}` field or `X-EPEE-Policy` header overrides the policy (docs/design.md, "HTTP contract").
Open Inference Protocol bodies (`POST /v2/models/{name}/infer`, n rows per request) are answered in that form
(docs/oip.md).
"""

from __future__ import annotations

from epee_core import ImageService
from handlers.base import EarlyExitHandler


class ImageHandler(EarlyExitHandler):
    service_class = ImageService
