"""Keeping secrets out of what instructkit prints and saves.

Three kinds: config values under a secret-looking key (``wandb_api_key``, ``hf_token``),
``user:password@`` in a URL, and secret values known at run time (an API key) wherever a
server echoes them back. A leaf module: config, logging, the judge and packaging all use it.
"""

from __future__ import annotations

import re
from typing import Iterable

MASK = "***"
# ``*_env`` keys name an environment variable (judge.api_key_env), they do not hold a secret.
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|(^|[_-])token)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_AUTH_VALUE = re.compile(r"\b(?P<kind>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def is_secret_key(key) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets``, URL credentials and Authorization values masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    return _AUTH_VALUE.sub(rf"\g<kind> {MASK}", text)


def redact(obj):
    """A copy of a config dict (or list, or string) fit to print or save: values of
    secret-looking keys masked, URL credentials masked in every string."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and isinstance(v, str) and v else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_text(obj)
    return obj
