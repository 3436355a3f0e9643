"""The four `tritonclient` flavours behind one small interface each.

Sync transports expose `submit` (start one inference, return a handle) and `wait` (its result), so
that the client keeps a bounded number of requests in flight from a single thread: gRPC through
`async_infer` callbacks, HTTP through greenlets on `tritonclient.http`'s connection pool (its client
is not thread-safe, so threads are not an option).  The greenlets return failures instead of raising
them, so gevent prints no traceback of its own.  Async transports expose a coroutine `infer`.

Every call goes through `translate_errors`, so only `ClientError`s leave this module.  A transport
talks to one model by default; `metadata`, `submit` and `infer` take another model's name (the
many-prompts companion) on the same connection, and the headers of the request (gRPC metadata or
HTTP headers: the image-affinity header of `evfsam.affinity`).

Inference timeouts are the client's alone: no gRPC deadline is sent with an inference, and a call
that outlasts `timeout` raises `RequestTimeout` here while the server finishes it.  A deadline that
expires on the server is a cancellation, and cancelling a request in flight is what can crash
tritonserver 2.51 (triton-inference-server/server issue 7368).  Metadata calls, which cannot be
cancelled mid-inference, keep the deadline.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Dict, List, Optional, Tuple

import gevent
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio

from .errors import InvalidInput, translate_errors

PROTOCOLS = ("grpc", "http")
# A full-size model on a small CPU takes 80+ s per image, and several requests may queue before it.
DEFAULT_TIMEOUT_S = 900.0
_SCHEMES = ("grpc://", "http://")
Headers = Optional[Dict[str, str]]


def normalise_url(url: str) -> str:
    """'http://host:port/' -> 'host:port' (tritonclient wants no scheme)."""
    for scheme in _SCHEMES:
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.rstrip("/")
    if not url:
        raise InvalidInput("the server URL is empty; expected host:port")
    return url


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise InvalidInput(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def check_timeout(timeout: Optional[float]) -> Optional[float]:
    """Seconds per request (None: wait forever)."""
    if timeout is not None and not timeout > 0:
        raise InvalidInput(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


class _Transport:
    protocol = ""
    module: Any = None

    def __init__(self, url: str, model: str, timeout: Optional[float]):
        self.url = normalise_url(url)
        self.model = model
        self.timeout = check_timeout(timeout)

    def errors(self, metadata_of: Optional[str] = None):
        """Translate failures; `metadata_of` names the model whose metadata is being read."""
        return translate_errors(self.url, self.protocol, self.timeout, metadata_of)

    def model_name(self, model: Optional[str]) -> str:
        return self.model if model is None else model


class GrpcTransport(_Transport):
    protocol = "grpc"
    module = grpcclient

    def __init__(self, url: str, model: str, timeout: Optional[float], concurrency: int):
        super().__init__(url, model, timeout)
        with self.errors():
            self._client = grpcclient.InferenceServerClient(self.url)

    def metadata(self, model: Optional[str] = None) -> Dict[str, Any]:
        model = self.model_name(model)
        with self.errors(metadata_of=model):
            return self._client.get_model_metadata(model, as_json=True, client_timeout=self.timeout)

    def submit(
        self, inputs: List[Any], outputs: List[Any], model: Optional[str] = None, headers: Headers = None
    ) -> "Future[Any]":
        future: "Future[Any]" = Future()

        def done(result: Any, error: Optional[Exception]) -> None:
            future.set_exception(error) if error is not None else future.set_result(result)

        with self.errors():
            self._client.async_infer(self.model_name(model), inputs, done, outputs=outputs, headers=headers)
        return future

    def wait(self, handle: "Future[Any]") -> Any:
        with self.errors():
            try:
                return handle.result(timeout=self.timeout)
            except FutureTimeout:
                raise TimeoutError from None  # the call goes on in the background; never cancelled

    def close(self) -> None:
        self._client.close()


class HttpTransport(_Transport):
    protocol = "http"
    module = httpclient

    def __init__(self, url: str, model: str, timeout: Optional[float], concurrency: int):
        super().__init__(url, model, timeout)
        with self.errors():
            self._client = httpclient.InferenceServerClient(
                self.url,
                concurrency=concurrency,
                connection_timeout=_seconds(timeout),
                network_timeout=_seconds(timeout),
            )

    def metadata(self, model: Optional[str] = None) -> Dict[str, Any]:
        model = self.model_name(model)
        with self.errors(metadata_of=model):
            return self._client.get_model_metadata(model)

    def submit(
        self, inputs: List[Any], outputs: List[Any], model: Optional[str] = None, headers: Headers = None
    ) -> "gevent.Greenlet":
        return gevent.spawn(self._infer_capturing_failure, self.model_name(model), inputs, outputs, headers)

    def wait(self, handle: "gevent.Greenlet") -> Any:
        result, failure = handle.get()
        with self.errors():
            if failure is not None:
                raise failure
            return result

    def _infer_capturing_failure(
        self, model: str, inputs: List[Any], outputs: List[Any], headers: Headers
    ) -> Tuple[Any, Optional[BaseException]]:
        try:
            return self._client.infer(model, inputs, outputs=outputs, headers=headers), None
        except Exception as exc:  # re-raised by `wait`, in the caller's frame
            return None, exc

    def close(self) -> None:
        self._client.close()


class AsyncGrpcTransport(_Transport):
    protocol = "grpc"
    module = grpcclient

    def __init__(self, url: str, model: str, timeout: Optional[float], concurrency: int):
        super().__init__(url, model, timeout)
        with self.errors():
            self._client = grpcclient_aio.InferenceServerClient(self.url)

    async def metadata(self, model: Optional[str] = None) -> Dict[str, Any]:
        model = self.model_name(model)
        with self.errors(metadata_of=model):
            return await self._client.get_model_metadata(model, as_json=True, client_timeout=self.timeout)

    async def infer(
        self, inputs: List[Any], outputs: List[Any], model: Optional[str] = None, headers: Headers = None
    ) -> Any:
        call = asyncio.ensure_future(
            self._client.infer(self.model_name(model), inputs, outputs=outputs, headers=headers))
        with self.errors():
            # shield: a timeout (or the caller's cancellation) stops the waiting, not the call
            return await asyncio.wait_for(asyncio.shield(call), self.timeout)

    async def close(self) -> None:
        await self._client.close()


class AsyncHttpTransport(_Transport):
    protocol = "http"
    module = httpclient

    def __init__(self, url: str, model: str, timeout: Optional[float], concurrency: int):
        super().__init__(url, model, timeout)
        with self.errors():
            self._client = httpclient_aio.InferenceServerClient(
                self.url, conn_limit=concurrency, conn_timeout=_seconds(timeout)
            )

    async def metadata(self, model: Optional[str] = None) -> Dict[str, Any]:
        model = self.model_name(model)
        with self.errors(metadata_of=model):
            return await self._client.get_model_metadata(model)

    async def infer(
        self, inputs: List[Any], outputs: List[Any], model: Optional[str] = None, headers: Headers = None
    ) -> Any:
        with self.errors():
            return await self._client.infer(self.model_name(model), inputs, outputs=outputs, headers=headers)

    async def close(self) -> None:
        await self._client.close()


SYNC_TRANSPORTS = {"grpc": GrpcTransport, "http": HttpTransport}
ASYNC_TRANSPORTS = {"grpc": AsyncGrpcTransport, "http": AsyncHttpTransport}


def _seconds(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else float(timeout)
