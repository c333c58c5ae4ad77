"""Who may see and who may change which image: small pure functions, the only place these rules live.

- Reading needs only a valid token: a caller sees every Public image and its own org's Customized ones.
- ``images:write`` manages the Customized images of the caller's own org.
- ``images:admin`` manages Public images and the Customized images of any org.
- An image the caller may not see is reported exactly like a missing one (404), never as forbidden.
"""

from __future__ import annotations

import uuid

from ..schemas import ImageType
from ..storage.records import PUBLIC_NAMESPACE
from .auth import SCOPE_ADMIN, SCOPE_WRITE, Principal
from .errors import NoSuchResource, NotPermitted

NOT_FOUND = "image not found"


def can_see(caller: Principal, image_type: ImageType, owner: uuid.UUID) -> bool:
    return image_type is ImageType.PUBLIC or owner == caller.org_id


def can_see_namespace(caller: Principal, namespace: str) -> bool:
    """``can_see`` for the read model's representation: "public", or the owner org's id text."""
    return org_sees(caller.org, namespace)


def org_sees(org: str, namespace: str) -> bool:
    """``can_see_namespace`` for an org's id text (the read model's views are per org)."""
    return namespace in (PUBLIC_NAMESPACE, org)


def can_manage(caller: Principal, image_type: ImageType, owner: uuid.UUID) -> bool:
    if caller.can(SCOPE_ADMIN):
        return True
    return caller.can(SCOPE_WRITE) and image_type is ImageType.CUSTOMIZED and owner == caller.org_id


def require_some_write_scope(caller: Principal) -> None:
    """Checked before a request body is read: a read-only token can change nothing."""
    if not (caller.can(SCOPE_WRITE) or caller.can(SCOPE_ADMIN)):
        raise NotPermitted(f"this operation needs the {SCOPE_WRITE} or {SCOPE_ADMIN} scope")


def check_create(caller: Principal, image_type: ImageType, owner: uuid.UUID) -> None:
    if caller.can(SCOPE_ADMIN):
        return
    if image_type is ImageType.PUBLIC:
        raise NotPermitted(f"publishing Public images needs the {SCOPE_ADMIN} scope")
    if owner != caller.org_id:
        raise NotPermitted("images:write creates images for the caller's own org only")


def check_change(caller: Principal, image_type: ImageType, owner: uuid.UUID) -> None:
    """For PATCH and DELETE of an existing image: hidden → 404, visible but not the caller's → 403."""
    if caller.can(SCOPE_ADMIN):
        return
    if not can_see(caller, image_type, owner):
        raise NoSuchResource(NOT_FOUND)
    if not can_manage(caller, image_type, owner):
        raise NotPermitted(f"changing this image needs the {SCOPE_ADMIN} scope")
