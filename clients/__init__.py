"""Python clients of the served EVF-SAM model (`evfsam.specs.EVF_SAM`) on `tritonclient`.

    from clients import SegmentationClient
    with SegmentationClient("127.0.0.1:8001", protocol="grpc") as client:
        result = client.segment("bus.jpg", "the red bus")   # .mask uint8 [H, W] 0/1, .score float

`AsyncSegmentationClient` is the asyncio twin.  Both take images as a path, bytes, a PIL image or an
RGB uint8 array, check the served model's metadata against the contract, and raise only the typed
`ClientError`s of `clients.errors`.  Command-line tools: `python -m clients.segment` and
`python -m clients.evaluate` (RefCOCO / RefCOCO+ / RefCOCOg cIoU and gIoU).
"""
from .aio import AsyncSegmentationClient
from .client import SegmentationClient
from .contract import Segmentation
from .errors import (
    ClientError,
    ContractMismatch,
    DatasetError,
    InvalidImage,
    InvalidInput,
    ModelUnavailable,
    OutputError,
    RequestTimeout,
    ServerError,
    ServerUnreachable,
)

__all__ = [
    "AsyncSegmentationClient",
    "SegmentationClient",
    "Segmentation",
    "ClientError",
    "ContractMismatch",
    "DatasetError",
    "InvalidImage",
    "InvalidInput",
    "ModelUnavailable",
    "OutputError",
    "RequestTimeout",
    "ServerError",
    "ServerUnreachable",
]
