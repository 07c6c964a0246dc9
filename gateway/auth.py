"""API keys: `Authorization: Bearer <key>` or `x-api-key: <key>`, compared in constant time.

Keys come from the environment (`TOKENWIRE_API_KEYS`, comma-separated) and/or a file (one key per line, `#`
comments). With no key configured the gateway is open, and says so at start. Keys are never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "TOKENWIRE_API_KEYS"


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys (as bytes, for hmac.compare_digest)."""

    keys: tuple[bytes, ...] = ()

    @property
    def open(self) -> bool:
        return not self.keys

    @classmethod
    def load(cls, file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ApiKeys:
        env = os.environ if environ is None else environ
        keys = [k.strip() for k in env.get(ENV_VAR, "").split(",")]
        if file is not None:
            keys += [line.split("#", 1)[0].strip() for line in Path(file).read_text().splitlines()]
        return cls(tuple(dict.fromkeys(k.encode() for k in keys if k)))

    def check(self, headers: Mapping[str, str]) -> str | None:
        """None when the request may pass, else why not (for the 401 message)."""
        if self.open:
            return None
        candidate = headers.get("x-api-key")
        auth = headers.get("authorization")
        if candidate is None and auth is not None:
            scheme, _, value = auth.partition(" ")
            candidate = value.strip() if scheme.lower() == "bearer" else None
        if not candidate:
            return "Missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`."
        given = candidate.encode()
        ok = False
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        return None if ok else "Incorrect API key provided."
