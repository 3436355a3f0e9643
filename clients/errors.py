"""Typed client errors, each with a one-line message and the exit code the command-line tools use.

| exit code | exception                              | meaning                                          |
|-----------|----------------------------------------|--------------------------------------------------|
| 2         | `InvalidInput` (`InvalidImage`, ...)   | a local input (image, dataset, option) is wrong  |
| 3         | `ServerUnreachable`                    | nothing answers at the URL                       |
| 4         | `RequestTimeout`                       | the server did not answer within the timeout     |
| 5         | `ContractMismatch` (`ModelUnavailable`)| the served model is not the `EVF_SAM` contract   |
| 6         | `ServerError` (`UnknownImageKey`)      | the server answered with an error                |
| 7         | `OutputError`                          | a result could not be written                    |

`translate_errors` turns what `tritonclient` (gRPC, HTTP, sync and asyncio) and its transports raise
into these, keeping the server's own message.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from tritonclient.utils import InferenceServerException


class ClientError(Exception):
    """Base of every error the clients raise on purpose; `str()` is a one-line message."""

    exit_code = 1


class InvalidInput(ClientError, ValueError):
    exit_code = 2


class InvalidImage(InvalidInput):
    """The image argument is not a path, bytes, PIL image or RGB array the client can send."""


class DatasetError(InvalidInput):
    """The evaluation dataset is missing or not in the RefCOCO on-disk format."""


class ServerUnreachable(ClientError, ConnectionError):
    exit_code = 3


class RequestTimeout(ClientError, TimeoutError):
    exit_code = 4


class ContractMismatch(ClientError):
    """The served model's metadata or outputs differ from `evfsam.specs.EVF_SAM`."""

    exit_code = 5


class ModelUnavailable(ContractMismatch):
    """The server answers but does not serve a ready model of the contract's name."""


class ServerError(ClientError):
    """The server rejected or failed a request; `server_message` holds its full text."""

    exit_code = 6

    def __init__(self, message: str, server_message: str = "", status: Optional[str] = None):
        super().__init__(message)
        self.server_message = server_message
        self.status = status


class UnknownImageKey(ServerError):
    """The server does not hold the image key sent instead of the image (never sent, or evicted from
    its embedding cache): send the image bytes again.  `image_key` is the key that was sent."""

    def __init__(self, message: str, server_message: str = "", status: Optional[str] = None, image_key: str = ""):
        super().__init__(message, server_message, status)
        self.image_key = image_key


# How the many-prompts model (model_repository/prompts.py) rejects an image key it does not hold:
# an invalid-argument error whose message says this.
_UNKNOWN_KEY_STATUSES = {"StatusCode.INVALID_ARGUMENT", "400"}
_UNKNOWN_KEY_TEXT = "never sent or evicted"


def unknown_image_key(error: ServerError, image_key: str) -> ClientError:
    """`error` as an `UnknownImageKey` when it is the server's refusal of `image_key`, else unchanged."""
    if error.status in _UNKNOWN_KEY_STATUSES and _UNKNOWN_KEY_TEXT in error.server_message:
        return UnknownImageKey(
            f"the server does not hold image key {image_key[:80]!r} (never sent or evicted from its cache); "
            "send the image bytes again",
            error.server_message,
            error.status,
            image_key,
        )
    return error


class OutputError(ClientError):
    exit_code = 7


# gRPC status codes (as tritonclient renders them) that mean "could not talk to the server".
_GRPC_UNREACHABLE = {"StatusCode.UNAVAILABLE"}
_GRPC_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED"}
_HTTP_LIBRARIES = ("aiohttp", "geventhttpclient")


def one_line(text: str, limit: int = 500) -> str:
    """The first non-empty line of `text`, shortened: a message, never a stack trace."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


@contextlib.contextmanager
def translate_errors(url: str, protocol: str, timeout: Optional[float], model: Optional[str] = None) -> Iterator[None]:
    """Re-raise transport and server failures as `ClientError`s.

    With `model` set (the metadata request), a server-side error means the model is not served;
    without it (an inference request), it is the server's failure of that request.
    """
    try:
        yield
    except ClientError:
        raise
    except InferenceServerException as exc:
        raise _from_server_exception(exc, url, protocol, timeout, model) from None
    except TimeoutError:  # socket.timeout, asyncio.TimeoutError, aiohttp.ServerTimeoutError
        raise _timeout(url, protocol, timeout) from None
    except OSError as exc:  # connection refused / reset, DNS failure, aiohttp.ClientConnectorError
        raise ServerUnreachable(f"cannot reach the Triton server at {url} over {protocol}: {_reason(exc)}") from None
    except BaseException as exc:  # gevent.Timeout derives from BaseException
        if _is_gevent_timeout(exc):
            raise _timeout(url, protocol, timeout) from None
        if _is_transport_error(exc):
            raise ServerUnreachable(
                f"no valid {protocol} answer from {url} (wrong port or protocol?): {_reason(exc)}"
            ) from None
        raise


def _from_server_exception(
    exc: InferenceServerException, url: str, protocol: str, timeout: Optional[float], model: Optional[str]
) -> ClientError:
    status = exc.status() or ""
    message = one_line(exc.message() or "")
    if status in _GRPC_TIMEOUT:
        return _timeout(url, protocol, timeout)
    if status in _GRPC_UNREACHABLE:
        return ServerUnreachable(f"cannot reach the Triton server at {url} over {protocol}: {message}")
    if model is not None:
        return ModelUnavailable(f"the server at {url} does not serve a ready model {model!r}: {message}")
    return ServerError(f"the server failed the request: {message}", exc.message() or "", status)


def _timeout(url: str, protocol: str, timeout: Optional[float]) -> RequestTimeout:
    within = f" within {timeout:g} s" if timeout is not None else ""
    return RequestTimeout(f"no answer from the Triton server at {url} over {protocol}{within}")


def _reason(exc: BaseException) -> str:
    return one_line(str(exc)) or type(exc).__name__


def _is_transport_error(exc: BaseException) -> bool:
    """HTTP-level failures (a hang-up, a reply that is not HTTP) of the two HTTP libraries; what
    they raise for socket failures is an OSError, handled before."""
    return any(
        # HTTPParseError comes from geventhttpclient's C parser, a top-level module of its own
        cls.__module__.split(".")[0] in _HTTP_LIBRARIES or cls.__name__ == "HTTPParseError"
        for cls in type(exc).__mro__
    )


def _is_gevent_timeout(exc: BaseException) -> bool:
    return any(cls.__module__.startswith("gevent") and cls.__name__ == "Timeout" for cls in type(exc).__mro__)
