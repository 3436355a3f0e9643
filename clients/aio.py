"""The asyncio client: `async with AsyncSegmentationClient(url) as client: await client.segment(...)`.

Entering the context (or `await client.connect()`) reads the model's metadata and checks it against
`evfsam.specs.EVF_SAM`.  Many prompts or images run as tasks, at most `concurrency` at a time, and
come back in request order.  After a failure the requests still in flight are waited for rather than
cancelled (see `SegmentationClient._drain` for why).  `segment_prompts` uses the many-prompts model
`evfsam.specs.EVF_SAM_PROMPTS` when served, as `SegmentationClient.segment_prompts` does.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Iterable, List, Optional, Sequence, TypeVar, Union

from evfsam.affinity import affinity_headers
from evfsam.specs import RAW_MASKS, ServedModelSpec

from .client import (
    DEFAULT_CONCURRENCY,
    SegmentRequest,
    check_concurrency,
    image_or_key,
    no_prompts_model,
    prompt_chunks,
)
from .contract import (
    DEFAULT_PROMPTS_SPEC,
    DEFAULT_SPEC,
    Segmentation,
    build_inputs,
    build_prompts_inputs,
    check_metadata,
    check_prompts,
    parse_prompts_result,
    parse_result,
    requested_outputs,
    requested_prompts_outputs,
    check_mask_format,
)
from .errors import ContractMismatch, ServerError, unknown_image_key
from .images import ImageInput, encode_image
from .transport import ASYNC_TRANSPORTS, DEFAULT_TIMEOUT_S, check_protocol

Requests = Union[Iterable[SegmentRequest], AsyncIterator[SegmentRequest]]
T = TypeVar("T")
R = TypeVar("R")


class AsyncSegmentationClient:
    """Text-prompted segmentation against the served `EVF_SAM` model, over gRPC or HTTP, in asyncio.

    `prompts_spec` is the many-prompts companion model used by `segment_prompts` when served
    (None: never use it).
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
        spec: ServedModelSpec = DEFAULT_SPEC,
        prompts_spec: Optional[ServedModelSpec] = DEFAULT_PROMPTS_SPEC,
    ):
        self.url = url
        self.protocol = check_protocol(protocol)
        self.timeout = timeout
        self.concurrency = check_concurrency(concurrency)
        self.spec = spec
        self.prompts_spec = prompts_spec
        self.metadata: Optional[dict] = None
        # Set by the first `serves_prompts_model()`: the companion's metadata, or why it is not used.
        self.prompts_metadata: Optional[dict] = None
        self._prompts_unusable: Optional[str] = None if prompts_spec is not None else "it is disabled"
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
        """One image, one prompt -> its mask and score (one `EVF_SAM` request)."""
        await self.connect()
        return await self._segment_encoded(encode_image(image), prompt)

    async def segment_prompts(
        self, image: Optional[ImageInput], prompts: Sequence[str], image_key: Optional[str] = None,
        mask_format: str = RAW_MASKS,
    ) -> List[Segmentation]:
        """One image, many prompts -> one `Segmentation` per prompt, in prompt order.

        As `SegmentationClient.segment_prompts`: one many-prompts request (per
        `MAX_PROMPTS_PER_REQUEST` prompts) when that model is served, each result with the server's
        `image_key`, which may be passed instead of the image later (`UnknownImageKey` if the server
        no longer holds it); concurrent single-prompt requests otherwise.
        """
        encoded, image_key = image_or_key(image, image_key)
        prompts = check_prompts(prompts)
        check_mask_format(mask_format)
        if not prompts:
            return []
        if not await self.serves_prompts_model():
            if image_key is not None:
                raise no_prompts_model(self._transport.url, self.prompts_spec, self._prompts_unusable)
            return [result async for result in self.segment_many((encoded, prompt) for prompt in prompts)]
        results: List[Segmentation] = []
        start = lambda chunk: self._segment_chunk(encoded, image_key, chunk, mask_format)  # noqa: E731
        async for part in self._in_order(prompt_chunks(prompts), start):
            results.extend(part)
        return results

    async def serves_prompts_model(self) -> bool:
        """Whether the server serves `prompts_spec` as the contract says (asked once, then cached).

        A missing model or one of another contract means no; an unreachable server or a timeout
        raises, and the question is asked again next time.
        """
        await self.connect()
        if self.prompts_metadata is None and self._prompts_unusable is None:
            assert self.prompts_spec is not None
            try:
                metadata = await self._transport.metadata(self.prompts_spec.name)
                check_metadata(metadata, self.prompts_spec)
            except ContractMismatch as exc:  # ModelUnavailable included
                self._prompts_unusable = str(exc)
            else:
                self.prompts_metadata = metadata
        return self.prompts_metadata is not None

    def segment_many(self, requests: Requests) -> AsyncIterator[Segmentation]:
        """(image, prompt) pairs (a plain or async iterable) -> segmentations in the same order,
        at most `concurrency` in flight; the requests are consumed lazily."""
        return self._in_order(requests, self._start_request)

    async def _in_order(
        self, items: Union[Iterable[T], AsyncIterator[T]], start: Callable[[T], Awaitable[R]]
    ) -> AsyncIterator[R]:
        """Run `start(item)` for each item as a task (lazily, `concurrency` at most) and yield the
        answers in order."""
        await self.connect()
        pending: Deque["asyncio.Task[R]"] = deque()
        try:
            async for item in _aiter(items):
                if len(pending) >= self.concurrency:
                    yield await _first_result(pending)
                pending.append(asyncio.ensure_future(start(item)))
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

    def _start_request(self, request: SegmentRequest) -> Awaitable[Segmentation]:
        image, prompt = request
        return self._segment_encoded(encode_image(image), prompt)

    async def _segment_encoded(self, image: bytes, prompt: str) -> Segmentation:
        module = self._transport.module
        inputs = build_inputs(module, image, prompt, self.spec)
        result = await self._transport.infer(inputs, requested_outputs(module, self.spec), headers=affinity_headers(image))
        return parse_result(result, prompt, self.spec)

    async def _segment_chunk(
        self, image: Optional[bytes], image_key: Optional[str], prompts: List[str], mask_format: str = RAW_MASKS
    ) -> List[Segmentation]:
        spec = self.prompts_spec
        assert spec is not None
        module = self._transport.module
        inputs = build_prompts_inputs(module, prompts, image, image_key, spec, mask_format)
        try:
            result = await self._transport.infer(
                inputs, requested_prompts_outputs(module, spec, mask_format), spec.name, affinity_headers(image, image_key)
            )
        except ServerError as exc:
            if image_key is None:
                raise
            raise unknown_image_key(exc, image_key) from None
        return parse_prompts_result(result, prompts, spec, mask_format)


async def _aiter(requests: Union[Iterable[T], AsyncIterator[T]]) -> AsyncIterator[T]:
    if hasattr(requests, "__aiter__"):
        async for request in requests:  # type: ignore[union-attr]
            yield request
    else:
        for request in requests:  # type: ignore[union-attr]
            yield request


async def _first_result(pending: Deque["asyncio.Task[R]"]) -> R:
    """The oldest request's result; if the caller is cancelled meanwhile, the request is not."""
    result = await asyncio.shield(pending[0])
    pending.popleft()
    return result


async def _drain(tasks: Deque["asyncio.Task[Any]"]) -> None:
    """Let abandoned requests finish, ignoring their results; cancelled only if this wait is."""
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
