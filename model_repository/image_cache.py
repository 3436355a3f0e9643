"""Triton python model `image_feature_cache`: the one image-feature cache of `evf_sam` and `evf_sam_prompts`.

Decoupled, one instance, `async def execute`: every request is answered from the event loop without
blocking it, so a request waiting for another one's claim never holds up the rest.  The cache only
stores and hands out entries (evfsam/embedding_cache.py); the callers decode and encode images
themselves, in their own processes.  Ops and tensors: `evfsam.specs.image_cache_spec`.
Counters and gauges on Triton's metrics port: `evfsam.specs.CACHE_METRICS`, CACHE_BYTES/ENTRIES_METRIC.
"""
import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from evfsam.embedding_cache import CachedImage, FeatureCache
from evfsam.model_config import CacheSettings, config_parameters
from evfsam.specs import (CACHE_BYTES_METRIC, CACHE_ENTRIES_METRIC, CACHE_GET, CACHE_METRICS, CACHE_PUT,
                          CACHE_RELEASE, ENCODES_IN_FLIGHT_METRIC, ENCODES_WAITING_METRIC, ORIGINAL_SIZE, RESIZED_SIZE,
                          cache_entry_tensors, family)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BadCacheRequest(ValueError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = CacheSettings.from_parameters(config_parameters(config))
        self.entry_tensors = cache_entry_tensors(family(settings.family))
        self.feature_names = [t.name for t in family(settings.family).image_features]
        self.cache = FeatureCache(settings.cache_bytes, settings.claim_timeout_s, settings.max_claims)
        self.tasks = set()
        self._init_metrics(config["name"])

    def _init_metrics(self, model_name):
        # Triton invalidates a Metric whose MetricFamily is garbage collected: keep the families.
        labels = {"model": model_name}
        self.families = {key: pb_utils.MetricFamily(name=name, description=f"image feature cache {key}",
                                                    kind=pb_utils.MetricFamily.COUNTER)
                         for key, name in CACHE_METRICS.items()}
        self.counters = {key: family.Metric(labels=labels) for key, family in self.families.items()}
        self.families["bytes"] = pb_utils.MetricFamily(name=CACHE_BYTES_METRIC, description="bytes held by the cache",
                                                       kind=pb_utils.MetricFamily.GAUGE)
        self.families["entries"] = pb_utils.MetricFamily(name=CACHE_ENTRIES_METRIC, description="images in the cache",
                                                         kind=pb_utils.MetricFamily.GAUGE)
        self.families["encoding"] = pb_utils.MetricFamily(name=ENCODES_IN_FLIGHT_METRIC, kind=pb_utils.MetricFamily.GAUGE,
                                                          description="images being encoded (claims in flight)")
        self.families["waiting"] = pb_utils.MetricFamily(name=ENCODES_WAITING_METRIC, kind=pb_utils.MetricFamily.GAUGE,
                                                         description="requests waiting for an image-encoder slot")
        self.gauges = {key: self.families[key].Metric(labels=labels) for key in ("bytes", "entries", "encoding", "waiting")}
        self.reported = {key: 0 for key in CACHE_METRICS}

    async def execute(self, requests):
        for request in requests:
            task = asyncio.ensure_future(self._answer(request))
            self.tasks.add(task)  # keep a reference until done (the loop holds only weak ones)
            task.add_done_callback(self.tasks.discard)
        return None

    async def _answer(self, request):
        sender = request.get_response_sender()
        try:
            response = await self._handle(request)
        except BadCacheRequest as exc:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        except Exception as exc:  # never leak a traceback or a path
            pb_utils.Logger.log_error(f"image_feature_cache failed: {type(exc).__name__}: {exc}")
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError("internal error in the feature cache"))
        sender.send(response, flags=FINAL)
        self._publish_metrics()

    async def _handle(self, request):
        op = _text(request, "op")
        key = _text(request, "image_key")
        if op == CACHE_GET:
            claim = pb_utils.get_input_tensor_by_name(request, "claim")
            lookup = asyncio.ensure_future(self.cache.get(key, claim=bool(claim is not None and claim.as_numpy().reshape(-1)[0])))
            await asyncio.sleep(0)  # the lookup runs up to its first wait: a request waiting for a slot is counted
            self._publish_metrics()
            status, entry = await lookup
            return self._respond(status, entry)
        if op == CACHE_PUT:
            self.cache.put(key, self._entry(request))
            return self._respond("stored")
        if op == CACHE_RELEASE:
            self.cache.release(key)
            return self._respond("released")
        raise BadCacheRequest(f"unknown cache op {op!r}")

    def _entry(self, request):
        tensors = {}
        for spec in self.entry_tensors:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise BadCacheRequest(f"put without {spec.name!r}")
            tensors[spec.name] = np.array(tensor.as_numpy(), copy=True)  # the request's buffer is not ours
        return CachedImage(
            features={name: tensors[name] for name in self.feature_names},
            images_evf=tensors["images_evf"],
            original_size=tuple(int(v) for v in tensors[ORIGINAL_SIZE.name]),
            resized_size=tuple(int(v) for v in tensors[RESIZED_SIZE.name]),
        )

    def _respond(self, status, entry=None):
        tensors = [pb_utils.Tensor("status", np.array([status.encode()], dtype=np.object_))]
        if entry is not None:
            tensors += [
                pb_utils.Tensor(ORIGINAL_SIZE.name, np.array(entry.original_size, dtype=np.int64)),
                pb_utils.Tensor(RESIZED_SIZE.name, np.array(entry.resized_size, dtype=np.int64)),
                pb_utils.Tensor("images_evf", entry.images_evf),
            ] + [pb_utils.Tensor(name, entry.features[name]) for name in self.feature_names]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _publish_metrics(self):
        counts = {"hits": self.cache.hits, "misses": self.cache.misses, "evictions": self.cache.evictions}
        for key, value in counts.items():
            if value > self.reported[key]:
                self.counters[key].increment(value - self.reported[key])
                self.reported[key] = value
        self.gauges["bytes"].set(self.cache.bytes)
        self.gauges["entries"].set(len(self.cache))
        self.gauges["encoding"].set(self.cache.claims_in_flight)
        self.gauges["waiting"].set(self.cache.waiting_for_slot)

    def finalize(self):
        for task in list(self.tasks):
            task.cancel()


def _text(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise BadCacheRequest(f"input {name!r} is missing")
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
