"""Request images: `data:` URLs decoded, object-store URIs read only under the allowed prefixes.

Any other scheme (http, file, ...) is refused: the server fetching arbitrary URLs would let a client make
it read local files or reach internal hosts. Pixels are checked where the data plane checks them
(components/data/transform.py: decodable, under data.max_image_pixels) by the prompt builder.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from components import storage
from components.config import DuetConfig, StorageSection
from components.serve.protocol import APIError


def allowed_roots(cfg: DuetConfig) -> tuple[str, ...]:
    """Where s3:// images may come from: serve.image_roots, else data.root when it is in an object store."""
    roots = list(cfg.serve.image_roots) or ([cfg.data.root] if storage.is_remote(cfg.data.root) else [])
    return tuple(root.rstrip("/") + "/" for root in roots)


def image_bytes(url: str, param: str, roots: Sequence[str], storage_cfg: StorageSection | None) -> bytes:
    """The encoded image an image_url part points at."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data: URL's payload is not valid base64", param=param) from None
        if not data:
            raise APIError(400, f"{param}: the data: URL holds no bytes", param=param)
        return data
    scheme = url.partition("://")[0] if "://" in url else ""
    if storage.is_remote(url):
        if not any(url.startswith(root) for root in roots):
            where = ", ".join(roots) or "nowhere (set serve.image_roots)"
            raise APIError(400, f"{param}: {url[:120]!r} is outside the storage this server reads images from: "
                                f"{where}", param=param)
        try:
            return storage.read_bytes(url, storage_cfg)
        except FileNotFoundError:
            raise APIError(400, f"{param}: no object at {url[:200]!r}", param=param) from None
    raise APIError(400, f"{param}: the {scheme or 'scheme-less'} URL scheme is not accepted; send the image as a "
                        "data: URL (base64) or an s3:// URI under the configured storage", param=param)
