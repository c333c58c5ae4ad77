"""The Python SDK for the Cluster Engine Images API.

    from cluster_engine.client import Client, NotFound

    with Client() as ce:                       # $CE_URL and $CE_TOKEN
        for image in ce.list_images(idc="us-west-1"):
            print(image.id, image.name)

``Client`` and ``AsyncClient`` return the server's own wire types (``ImageResp`` …, from
``cluster_engine.schemas``) and raise the errors drawn in ``cluster_engine.client.errors``.
"""

from ..schemas import (
    Error,
    ErrorStatusMessage,
    ImageBootMode,
    ImageCreateReq,
    ImageResp,
    ImageType,
    Partition,
    ValidationDetail,
)
from ._async import AsyncClient
from ._base import Retry
from ._sync import Client
from .errors import (
    AuthError,
    ClusterEngineError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    TransportError,
    ValidationError,
)

__all__ = [
    "AsyncClient",
    "AuthError",
    "Client",
    "ClusterEngineError",
    "Conflict",
    "Error",
    "ErrorStatusMessage",
    "Forbidden",
    "ImageBootMode",
    "ImageCreateReq",
    "ImageResp",
    "ImageType",
    "NotFound",
    "Partition",
    "PayloadTooLarge",
    "Retry",
    "ServerError",
    "ServiceUnavailable",
    "TransportError",
    "ValidationDetail",
    "ValidationError",
]
