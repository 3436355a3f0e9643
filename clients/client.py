"""The synchronous client: `SegmentationClient(url).segment(image, prompt)`.

On construction it reads the model's metadata and checks it against `evfsam.specs.EVF_SAM`, so a
wrong server fails at once with a `ClientError` rather than at the first image.  Many prompts or many
images go out with at most `concurrency` requests in flight and come back in request order.

Many prompts for one image (`segment_prompts`) go to the companion model `evfsam.specs.EVF_SAM_PROMPTS`
when the server serves it (checked once, at the first such call): one request per
`MAX_PROMPTS_PER_REQUEST` prompts, the image encoded once on the server and its embedding cached
under the returned `Segmentation.image_key`, which a later call may send instead of the image.
Without that model the prompts go to `EVF_SAM` as concurrent single-prompt requests.

Every request carries the image-affinity header `x-image-key` (`evfsam.affinity`), so a proxy in front
of several replicas sends all requests for one image to the replica whose cache holds it.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Callable, Deque, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from evfsam.affinity import affinity_headers
from evfsam.specs import MAX_PROMPTS_PER_REQUEST, RAW_MASKS, ServedModelSpec

from .contract import (
    DEFAULT_PROMPTS_SPEC,
    DEFAULT_SPEC,
    Segmentation,
    build_inputs,
    build_prompts_inputs,
    check_image_key,
    check_metadata,
    check_prompts,
    parse_prompts_result,
    parse_result,
    requested_outputs,
    requested_prompts_outputs,
    check_mask_format,
)
from .errors import ClientError, ContractMismatch, InvalidInput, ModelUnavailable, ServerError, unknown_image_key
from .images import ImageInput, encode_image
from .transport import DEFAULT_TIMEOUT_S, SYNC_TRANSPORTS, check_protocol

SegmentRequest = Tuple[ImageInput, str]
DEFAULT_CONCURRENCY = 4
T = TypeVar("T")
R = TypeVar("R")
# A request in flight: the transport's handle, and what waits for it and returns the caller's answer.
Pending = Tuple[Any, Callable[[Any], Any]]


class SegmentationClient:
    """Text-prompted segmentation against the served `EVF_SAM` model, over gRPC or HTTP.

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
        self.spec = spec
        self.prompts_spec = prompts_spec
        self.concurrency = check_concurrency(concurrency)
        # Set by the first `serves_prompts_model()`: the companion's metadata, or why it is not used.
        self.prompts_metadata: Optional[dict] = None
        self._prompts_unusable: Optional[str] = None if prompts_spec is not None else "it is disabled"
        transport_class = SYNC_TRANSPORTS[check_protocol(protocol)]
        self._transport = transport_class(url, spec.name, timeout, self.concurrency)
        try:
            self.metadata = self._transport.metadata()
            check_metadata(self.metadata, spec)
        except BaseException:
            self.close()
            raise

    def segment(self, image: ImageInput, prompt: str) -> Segmentation:
        """One image, one prompt -> its mask and score (one `EVF_SAM` request)."""
        return list(self.segment_many([(image, prompt)]))[0]

    def segment_prompts(
        self, image: Optional[ImageInput], prompts: Sequence[str], image_key: Optional[str] = None,
        mask_format: str = RAW_MASKS,
    ) -> List[Segmentation]:
        """One image, many prompts -> one `Segmentation` per prompt, in prompt order.

        With the many-prompts model served, the prompts go in one request (one per
        `MAX_PROMPTS_PER_REQUEST`) and every result carries the server's `image_key`.  Instead of
        the image, pass `image=None, image_key=<a key returned before>` to skip sending and encoding
        it again; a key the server no longer holds raises `UnknownImageKey` (send the image again).
        Without the many-prompts model, the image is encoded once and the prompts are sent as
        concurrent single-prompt requests (`image_key` is None, and passing one raises
        `ModelUnavailable`).
        """
        encoded, image_key = image_or_key(image, image_key)
        prompts = check_prompts(prompts)
        check_mask_format(mask_format)
        if not prompts:
            return []
        if not self.serves_prompts_model():
            if image_key is not None:
                raise no_prompts_model(self._transport.url, self.prompts_spec, self._prompts_unusable)
            return list(self.segment_many((encoded, prompt) for prompt in prompts))
        results: List[Segmentation] = []
        start = lambda chunk: self._start_prompts(encoded, image_key, chunk, mask_format)  # noqa: E731
        for part in self._in_order(prompt_chunks(prompts), start):
            results.extend(part)
        return results

    def serves_prompts_model(self) -> bool:
        """Whether the server serves `prompts_spec` as the contract says (asked once, then cached).

        A missing model or one of another contract means no; an unreachable server or a timeout
        raises, and the question is asked again next time.
        """
        if self.prompts_metadata is None and self._prompts_unusable is None:
            assert self.prompts_spec is not None
            try:
                metadata = self._transport.metadata(self.prompts_spec.name)
                check_metadata(metadata, self.prompts_spec)
            except ContractMismatch as exc:  # ModelUnavailable included
                self._prompts_unusable = str(exc)
            else:
                self.prompts_metadata = metadata
        return self.prompts_metadata is not None

    def segment_many(self, requests: Iterable[SegmentRequest]) -> Iterator[Segmentation]:
        """(image, prompt) pairs -> segmentations in the same order, `concurrency` in flight at most.

        The iterable is consumed lazily, so a long stream of images is never all in memory.  If
        anything fails (or the caller stops early), the requests in flight are waited for, never
        cancelled: see `_drain`.
        """
        return self._in_order(requests, self._start_request)

    def _in_order(self, items: Iterable[T], start: Callable[[T], Pending]) -> Iterator[Any]:
        """`start` each item (lazily, `concurrency` in flight at most) and yield the answers in order."""
        pending: Deque[Pending] = deque()
        try:
            for item in items:
                if len(pending) >= self.concurrency:
                    yield self._finish(*pending.popleft())
                pending.append(start(item))
            while pending:
                yield self._finish(*pending.popleft())
        finally:
            self._drain(pending)

    def _drain(self, pending: Deque[Pending]) -> None:
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

    def _start_request(self, request: SegmentRequest) -> Pending:
        image, prompt = request
        return self._start(image, prompt)

    def _start(self, image: ImageInput, prompt: str) -> Pending:
        module = self._transport.module
        encoded = encode_image(image)
        inputs = build_inputs(module, encoded, prompt, self.spec)
        handle = self._transport.submit(inputs, requested_outputs(module, self.spec), headers=affinity_headers(encoded))
        return handle, lambda done: parse_result(self._transport.wait(done), prompt, self.spec)

    def _start_prompts(self, image: Optional[bytes], image_key: Optional[str], prompts: List[str],
                       mask_format: str) -> Pending:
        spec = self.prompts_spec
        assert spec is not None
        module = self._transport.module
        inputs = build_prompts_inputs(module, prompts, image, image_key, spec, mask_format)
        handle = self._transport.submit(inputs, requested_prompts_outputs(module, spec, mask_format), spec.name,
                                        affinity_headers(image, image_key))
        return handle, lambda done: self._finish_prompts(done, prompts, image_key, mask_format)

    def _finish_prompts(self, handle: Any, prompts: List[str], image_key: Optional[str],
                        mask_format: str) -> List[Segmentation]:
        assert self.prompts_spec is not None
        try:
            result = self._transport.wait(handle)
        except ServerError as exc:
            if image_key is None:
                raise
            raise unknown_image_key(exc, image_key) from None
        return parse_prompts_result(result, prompts, self.prompts_spec, mask_format)

    @staticmethod
    def _finish(handle: Any, finish: Callable[[Any], R]) -> R:
        return finish(handle)


def check_concurrency(concurrency: int) -> int:
    if not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInput(f"concurrency must be a positive integer, got {concurrency!r}")
    return concurrency


def image_or_key(image: Optional[ImageInput], image_key: Optional[str]) -> Tuple[Optional[bytes], Optional[str]]:
    """(encoded image, None) or (None, checked key): exactly one of the two must be given."""
    if image_key is None:
        if image is None:
            raise InvalidInput("give an image, or the image_key of one sent before")
        return encode_image(image), None
    if image is not None:
        raise InvalidInput("give an image or an image_key, not both")
    return None, check_image_key(image_key)


def prompt_chunks(prompts: List[str]) -> List[List[str]]:
    return [prompts[start:start + MAX_PROMPTS_PER_REQUEST] for start in range(0, len(prompts), MAX_PROMPTS_PER_REQUEST)]


def no_prompts_model(url: str, spec: Optional[ServedModelSpec], reason: Optional[str]) -> ModelUnavailable:
    name = repr(spec.name) if spec is not None else "a many-prompts model"
    return ModelUnavailable(f"image keys need {name}, which the client cannot use at {url}: {reason}")
