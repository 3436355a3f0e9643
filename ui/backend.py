"""What the page asks of the Triton server, through the project's asyncio client (`clients.aio`).

One long-lived `AsyncSegmentationClient` per protocol: it is never closed while requests may be in
flight (closing a gRPC channel cancels them, which can crash tritonserver 2.51; see
`clients.client.SegmentationClient._drain`), and it reconnects by itself after the server comes back.
The served model's identity comes from its config parameters (`serving/repository.py` writes
`checkpoint`, `checkpoint_sha256`, `family`, `recipe`), read with `tritonclient`'s
`get_model_config` on every request, so a server restarted on another checkpoint shows at once.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http.aio as httpclient_aio

from clients.aio import AsyncSegmentationClient
from clients.contract import Segmentation
from clients.errors import InvalidInput, translate_errors
from clients.transport import PROTOCOLS, normalise_url
from evfsam.model_config import config_parameters
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS

IDENTITY_PARAMETERS = ("checkpoint", "checkpoint_sha256", "family", "recipe")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModelIdentity:
    """What the served model says it serves ("unknown" where a repository predates the parameter)."""

    model: str
    checkpoint: str
    checkpoint_sha256: str
    family: str
    recipe: str

    def to_json(self) -> Dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    segmentations: List[Segmentation]
    latency_s: float  # the Triton request(s), as this process saw them
    identity: ModelIdentity


class Backend:
    """The Triton server at one URL per protocol (`{"grpc": "host:port", "http": "host:port"}`)."""

    def __init__(self, urls: Mapping[str, str], timeout: float):
        unknown = sorted(set(urls) - set(PROTOCOLS))
        if unknown or not urls:
            raise InvalidInput(f"server URLs must be given for {' and/or '.join(PROTOCOLS)}, got {sorted(urls)}")
        self.urls = {protocol: normalise_url(url) for protocol, url in urls.items()}
        self.timeout = timeout
        self._clients: Dict[str, AsyncSegmentationClient] = {}
        self._config_clients: Dict[str, Any] = {}

    @property
    def protocols(self) -> List[str]:
        return [protocol for protocol in PROTOCOLS if protocol in self.urls]

    async def segment(self, protocol: str, image: Optional[bytes], image_key: Optional[str],
                      prompts: Sequence[str]) -> Answer:
        """One image (or the key of one sent before) and its prompts -> masks, scores, cache state."""
        client = self._client(protocol)
        await client.serves_prompts_model()  # connection and contract checks: not part of the latency
        started = time.perf_counter()
        segmentations = await client.segment_prompts(image, prompts, image_key=image_key)
        latency_s = time.perf_counter() - started
        return Answer(segmentations, latency_s, await self.identity(protocol))

    async def identity(self, protocol: str) -> ModelIdentity:
        client = self._client(protocol)
        name = EVF_SAM_PROMPTS.name if await client.serves_prompts_model() else EVF_SAM.name
        config = await self._model_config(protocol, name)
        params = config_parameters(config)
        return ModelIdentity(name, *(params.get(key, UNKNOWN) for key in IDENTITY_PARAMETERS))

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        for config_client in self._config_clients.values():
            await config_client.close()
        self._clients.clear()
        self._config_clients.clear()

    def _client(self, protocol: str) -> AsyncSegmentationClient:
        if protocol not in self.urls:
            raise InvalidInput(f"protocol {protocol!r:.20} is not offered here; choose one of {', '.join(self.protocols)}")
        if protocol not in self._clients:
            self._clients[protocol] = AsyncSegmentationClient(self.urls[protocol], protocol, self.timeout)
        return self._clients[protocol]

    async def _model_config(self, protocol: str, name: str) -> Mapping[str, Any]:
        url = self.urls[protocol]
        with translate_errors(url, protocol, self.timeout, model=name):
            if protocol not in self._config_clients:
                self._config_clients[protocol] = (
                    grpcclient_aio.InferenceServerClient(url) if protocol == "grpc"
                    else httpclient_aio.InferenceServerClient(url, conn_timeout=self.timeout))
            config_client = self._config_clients[protocol]
            if protocol == "grpc":
                answer = await config_client.get_model_config(name, as_json=True, client_timeout=self.timeout)
                return answer["config"]
            return await config_client.get_model_config(name)
