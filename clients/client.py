"""The synchronous client: `SegmentationClient(url).segment(image, prompt)`.

On construction it reads the model's metadata and checks it against `evfsam.specs.EVF_SAM`, so a
wrong server fails at once with a `ClientError` rather than at the first image.  Many prompts or many
images go out with at most `concurrency` requests in flight and come back in request order.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Deque, Iterable, Iterator, List, Optional, Sequence, Tuple

from evfsam.specs import ServedModelSpec

from .contract import DEFAULT_SPEC, Segmentation, build_inputs, check_metadata, parse_result, requested_outputs
from .errors import ClientError, InvalidInput
from .images import ImageInput, encode_image
from .transport import DEFAULT_TIMEOUT_S, SYNC_TRANSPORTS, check_protocol

SegmentRequest = Tuple[ImageInput, str]
DEFAULT_CONCURRENCY = 4


class SegmentationClient:
    """Text-prompted segmentation against the served `EVF_SAM` model, over gRPC or HTTP."""

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
        spec: ServedModelSpec = DEFAULT_SPEC,
    ):
        self.spec = spec
        self.concurrency = check_concurrency(concurrency)
        transport_class = SYNC_TRANSPORTS[check_protocol(protocol)]
        self._transport = transport_class(url, spec.name, timeout, self.concurrency)
        try:
            self.metadata = self._transport.metadata()
            check_metadata(self.metadata, spec)
        except BaseException:
            self.close()
            raise

    def segment(self, image: ImageInput, prompt: str) -> Segmentation:
        """One image, one prompt -> its mask and score."""
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: ImageInput, prompts: Sequence[str]) -> List[Segmentation]:
        """One image, many prompts: the image is encoded once and the prompts sent concurrently."""
        encoded = encode_image(image)
        return list(self.segment_many((encoded, prompt) for prompt in prompts))

    def segment_many(self, requests: Iterable[SegmentRequest]) -> Iterator[Segmentation]:
        """(image, prompt) pairs -> segmentations in the same order, `concurrency` in flight at most.

        The iterable is consumed lazily, so a long stream of images is never all in memory.  If
        anything fails (or the caller stops early), the requests in flight are waited for, never
        cancelled: see `_drain`.
        """
        pending: Deque[Tuple[Any, str]] = deque()
        try:
            for image, prompt in requests:
                if len(pending) >= self.concurrency:
                    yield self._finish(*pending.popleft())
                pending.append((self._start(image, prompt), prompt))
            while pending:
                yield self._finish(*pending.popleft())
        finally:
            self._drain(pending)

    def _drain(self, pending: Deque[Tuple[Any, str]]) -> None:
        """Wait for abandoned requests to finish, ignoring their results.

        Cancelling a gRPC request while tritonserver 2.51 answers it can crash the server (a race in
        its cancellation handling), and closing the channel would cancel them.
        """
        while pending:
            handle, _ = pending.popleft()
            with contextlib.suppress(ClientError):
                self._transport.wait(handle)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _start(self, image: ImageInput, prompt: str) -> Any:
        module = self._transport.module
        inputs = build_inputs(module, encode_image(image), prompt, self.spec)
        return self._transport.submit(inputs, requested_outputs(module, self.spec))

    def _finish(self, handle: Any, prompt: str) -> Segmentation:
        return parse_result(self._transport.wait(handle), prompt, self.spec)


def check_concurrency(concurrency: int) -> int:
    if not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInput(f"concurrency must be a positive integer, got {concurrency!r}")
    return concurrency
