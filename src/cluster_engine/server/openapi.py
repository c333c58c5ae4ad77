"""The served OpenAPI document: the given contract, verbatim, deep-merged with our documented extensions."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import yaml

CONTRACT_FILE = "list-images.openapi.yaml"
EXTENSIONS_FILE = "extensions.yaml"


def _load(name: str) -> dict[str, Any]:
    text = (resources.files("cluster_engine") / "contract" / name).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def contract() -> dict[str, Any]:
    return _load(CONTRACT_FILE)


def merge(base: Any, extra: Any) -> Any:
    """Dicts merge key by key, lists append what they lack, anything else: ``extra`` wins."""
    if isinstance(base, dict) and isinstance(extra, dict):
        merged = dict(base)
        for key, value in extra.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(extra, list):
        return base + [item for item in extra if item not in base]
    return extra


@functools.cache
def document() -> dict[str, Any]:
    """The merge, except ``servers``: ours come first, so that clients generated from the document (and
    Swagger UI's "Try it out") default to the service that serves it, not to the contract's production
    server, which follows."""
    base, extensions = contract(), _load(EXTENSIONS_FILE)
    served: dict[str, Any] = merge(base, extensions)
    served["servers"] = merge(extensions.get("servers", []), base.get("servers", []))
    return served


@functools.cache
def document_json() -> bytes:
    return json.dumps(document(), indent=2).encode()


@functools.cache
def document_yaml() -> bytes:
    return yaml.safe_dump(document(), sort_keys=False, allow_unicode=True).encode()
