"""Credentials never reach MLflow: everything logged goes through `redact` / `redact_tree` first.

Keys named like credentials are dropped; values that look like one are masked: AWS key ids and
secrets, `user:password@` in URLs, and the literal values of credential environment variables
such as ``AWS_SECRET_ACCESS_KEY`` or ``MLFLOW_TRACKING_TOKEN``. Registry and packaging use it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from components.config import environ_snapshot

REDACTED = "***"


_SECRET_WORDS = {"key", "keys", "secret", "secrets", "token", "password", "passwd", "pwd", "credential",
                 "credentials", "apikey", "auth"}


_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")


_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])[A-Za-z0-9/+=]{40}"
                         r"(?![A-Za-z0-9/+=])")


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")


_MIN_ENV_SECRET = 8  # shorter values (true, 0, none) are switches, not secrets; masking them would garble text


def is_secret_name(name: str) -> bool:
    """True when a key or variable name reads like a credential (words split on non-letters and case)."""
    words = re.split(r"[^a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower())
    return any(w in _SECRET_WORDS for w in words)


# Shell variables whose names only look like credentials (PWD is the working directory, not a password).
_NOT_SECRET_ENV = {"PWD", "OLDPWD"}


def _env_secrets() -> list[str]:
    """Values of credential-named environment variables, so they can be masked wherever they turn up."""
    values = {
        v for k, v in environ_snapshot().items()
        if k not in _NOT_SECRET_ENV and is_secret_name(k) and len(v) >= _MIN_ENV_SECRET
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Mask anything in a string that looks like a credential."""
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    return _AWS_SECRET.sub(REDACTED, text)


def redact_tree(tree: Any) -> Any:
    """A copy of nested dicts/lists with credential-named keys dropped and string values masked."""
    if isinstance(tree, Mapping):
        return {str(k): redact_tree(v) for k, v in tree.items() if not is_secret_name(str(k))}
    if isinstance(tree, list | tuple):
        return [redact_tree(v) for v in tree]
    if isinstance(tree, str):
        return redact(tree)
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted-key view of nested dicts; lists become JSON text, None becomes 'null'."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        elif isinstance(value, str):
            flat[dotted] = value
        else:
            flat[dotted] = json.dumps(value)
    return flat
