"""The asyncio client: `async with AsyncSegmentationClient(url) as client: await client.segment(...)`.

Entering the context (or `await client.connect()`) reads the model's metadata and checks it against
`evfsam.specs.EVF_SAM`.  Many prompts or images run as tasks, at most `concurrency` at a time, and
come back in request order.  After a failure the requests still in flight are waited for rather than
cancelled (see `SegmentationClient._drain` for why).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, AsyncIterator, Deque, Iterable, List, Optional, Sequence, Union

from evfsam.specs import ServedModelSpec

from .client import DEFAULT_CONCURRENCY, SegmentRequest, check_concurrency
from .contract import DEFAULT_SPEC, Segmentation, build_inputs, check_metadata, parse_result, requested_outputs
from .images import ImageInput, encode_image
from .transport import ASYNC_TRANSPORTS, DEFAULT_TIMEOUT_S, check_protocol

Requests = Union[Iterable[SegmentRequest], AsyncIterator[SegmentRequest]]


class AsyncSegmentationClient:
    """Text-prompted segmentation against the served `EVF_SAM` model, over gRPC or HTTP, in asyncio."""

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
        spec: ServedModelSpec = DEFAULT_SPEC,
    ):
        self.url = url
        self.protocol = check_protocol(protocol)
        self.timeout = timeout
        self.concurrency = check_concurrency(concurrency)
        self.spec = spec
        self.metadata: Optional[dict] = None
        self._transport: Any = None

    async def connect(self) -> "AsyncSegmentationClient":
        """Open the connection and check the served model against the contract (idempotent)."""
        if self._transport is None:
            transport_class = ASYNC_TRANSPORTS[self.protocol]
            self._transport = transport_class(self.url, self.spec.name, self.timeout, self.concurrency)
        if self.metadata is None:
            metadata = await self._transport.metadata()
            check_metadata(metadata, self.spec)
            self.metadata = metadata
        return self

    async def segment(self, image: ImageInput, prompt: str) -> Segmentation:
        """One image, one prompt -> its mask and score."""
        await self.connect()
        return await self._segment_encoded(encode_image(image), prompt)

    async def segment_prompts(self, image: ImageInput, prompts: Sequence[str]) -> List[Segmentation]:
        """One image, many prompts: the image is encoded once and the prompts sent concurrently."""
        encoded = encode_image(image)
        return [result async for result in self.segment_many((encoded, prompt) for prompt in prompts)]

    async def segment_many(self, requests: Requests) -> AsyncIterator[Segmentation]:
        """(image, prompt) pairs (a plain or async iterable) -> segmentations in the same order,
        at most `concurrency` in flight; the requests are consumed lazily."""
        await self.connect()
        pending: Deque["asyncio.Task[Segmentation]"] = deque()
        try:
            async for image, prompt in _aiter(requests):
                if len(pending) >= self.concurrency:
                    yield await _first_result(pending)
                pending.append(asyncio.ensure_future(self._segment_encoded(encode_image(image), prompt)))
            while pending:
                yield await _first_result(pending)
        finally:
            await _drain(pending)

    async def close(self) -> None:
        if self._transport is not None:
            transport, self._transport = self._transport, None
            await transport.close()

    async def __aenter__(self) -> "AsyncSegmentationClient":
        try:
            return await self.connect()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def _segment_encoded(self, image: bytes, prompt: str) -> Segmentation:
        module = self._transport.module
        inputs = build_inputs(module, image, prompt, self.spec)
        result = await self._transport.infer(inputs, requested_outputs(module, self.spec))
        return parse_result(result, prompt, self.spec)


async def _aiter(requests: Requests) -> AsyncIterator[SegmentRequest]:
    if hasattr(requests, "__aiter__"):
        async for request in requests:  # type: ignore[union-attr]
            yield request
    else:
        for request in requests:  # type: ignore[union-attr]
            yield request


async def _first_result(pending: Deque["asyncio.Task[Segmentation]"]) -> Segmentation:
    """The oldest request's result; if the caller is cancelled meanwhile, the request is not."""
    result = await asyncio.shield(pending[0])
    pending.popleft()
    return result


async def _drain(tasks: Deque["asyncio.Task[Segmentation]"]) -> None:
    """Let abandoned requests finish, ignoring their results; cancelled only if this wait is."""
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
