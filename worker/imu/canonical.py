"""Canonical JSON, defined once: sorted keys, no whitespace, UTF-8 text (not \\u escapes).

What the hashes are taken over: recipe identities here, and in the service (through
`service.engine`) the audit chain, text-record digests and signed payloads. torch-free.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
