"""Python clients of the served EVF-SAM model (`evfsam.specs.EVF_SAM`) on `tritonclient`.

    from clients import SegmentationClient
    with SegmentationClient("127.0.0.1:8001", protocol="grpc") as client:
        result = client.segment("bus.jpg", "the red bus")   # .mask uint8 [H, W] 0/1, .score float
        results = client.segment_prompts("bus.jpg", ["the red bus", "the wheel"])  # one per prompt
        again = client.segment_prompts(None, ["the driver"], image_key=results[0].image_key)

`AsyncSegmentationClient` is the asyncio twin.  Both take images as a path, bytes, a PIL image or an
RGB uint8 array, check the served model's metadata against the contract, and raise only the typed
`ClientError`s of `clients.errors`.  `segment_prompts` sends all the prompts of an image in one request
to the many-prompts model (`evfsam.specs.EVF_SAM_PROMPTS`) when the server serves it, and returns the
key under which the server caches the image (`Segmentation.image_key`; `UnknownImageKey` once it is
evicted); otherwise it sends one `EVF_SAM` request per prompt.  Command-line tools:
`python -m clients.segment` and `python -m clients.evaluate` (RefCOCO / RefCOCO+ / RefCOCOg cIoU and
gIoU).
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
    UnknownImageKey,
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
    "UnknownImageKey",
]
