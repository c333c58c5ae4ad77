"""Image bodies of requests: ``POST /v1/images`` (ImageCreateReq plus type) and ``PATCH`` (a JSON merge patch
on the stored image), checked field by field with the rules of ``rules.images``."""

from __future__ import annotations

from typing import Any

from ..rules.fields import detail
from ..rules.images import _Fields
from ..rules.images import read_image_create as read_image_create
from ..schemas import ImageCreateReq, ImageType, ValidationDetail
from .errors import RequestInvalid


def read_create_request(data: Any) -> tuple[ImageCreateReq, ImageType]:
    """``POST /v1/images`` body: an ImageCreateReq plus optional ``type`` (default Customized)."""
    problems: list[ValidationDetail] = []
    spec = read_image_create(data, problems)
    image_type = ImageType.CUSTOMIZED
    if isinstance(data, dict):
        image_type = _Fields(data, "", problems).enum("type", ImageType, required=False) or image_type
    if problems or spec is None:
        raise RequestInvalid(problems)
    return spec, image_type


IMMUTABLE_FIELDS = ("id", "type", "orgId", "idc", "createdAt")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def read_patch(current: dict[str, Any], patch: Any) -> ImageCreateReq:
    """Apply a merge patch to an image's current fields and validate the result as a whole."""
    if not isinstance(patch, dict):
        raise RequestInvalid(
            [detail("body", "type", "A merge patch must be a JSON object.", patch, "object")]
        )
    problems = [
        detail(name, "readonly", "This field cannot be changed.", patch[name])
        for name in IMMUTABLE_FIELDS
        if name in patch and patch[name] != current.get(name)
    ]
    merged = merge_patch(current, patch)
    spec = read_image_create(merged, problems)
    if problems or spec is None:
        raise RequestInvalid(problems)
    return spec
