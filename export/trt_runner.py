"""Run a serialized TensorRT engine on numpy inputs: the engine runner of the accuracy gate.

Device memory and copies go through the CUDA runtime library itself (ctypes), not torch or
cuda-python: the export image's torch is the validated CPU build (docker/Dockerfile.export), and the
NGC image ships libcudart with its TensorRT.  The calls are the TensorRT 10 name-based I/O API
(`set_input_shape`, `get_tensor_shape`, `set_tensor_address`, `execute_async_v3`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

CUDART_NAMES = ("cudart", "libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0")
MEMCPY_HOST_TO_DEVICE, MEMCPY_DEVICE_TO_HOST = 1, 2
# What a fused attention kernel or layer is called in TensorRT's engine information (kernel and Myelin
# names such as `_gemm_mha_v2`, `fmha`, `...Attention...`): evidence to record, not a definition.
ATTENTION_EVIDENCE = re.compile(r"mha|fmha|attention", re.IGNORECASE)


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message carries CUDA's own error string."""


class EngineRunError(RuntimeError):
    """TensorRT refused to load or run an engine."""


def load_cudart(names: Sequence[str] = CUDART_NAMES) -> ctypes.CDLL:
    for name in names:
        path = ctypes.util.find_library(name) if "." not in name else name
        if not path:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise CudaError(f"the CUDA runtime library is not loadable here (tried {', '.join(names)})")


class CudaRuntime:
    """The handful of CUDA runtime calls the runner needs."""

    def __init__(self, library: Optional[ctypes.CDLL] = None):
        self.lib = library or load_cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]

    def check(self, status: int, call: str) -> None:
        if status != 0:
            message = self.lib.cudaGetErrorString(status).decode(errors="replace")
            raise CudaError(f"{call} failed with CUDA error {status}: {message}")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), max(nbytes, 1)), f"cudaMalloc({nbytes})")
        return pointer.value

    def free(self, pointer: int) -> None:
        self.check(self.lib.cudaFree(pointer), "cudaFree")

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self.check(self.lib.cudaMemcpy(pointer, array.ctypes.data, array.nbytes, MEMCPY_HOST_TO_DEVICE),
                   "cudaMemcpy host to device")

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self.check(self.lib.cudaMemcpy(array.ctypes.data, pointer, array.nbytes, MEMCPY_DEVICE_TO_HOST),
                   "cudaMemcpy device to host")

    def stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(stream), "cudaStreamDestroy")


class TensorRTRunner:
    """One deserialized engine and one execution context (optimisation profile 0)."""

    def __init__(self, trt, plan: bytes, logger=None, cuda: Optional[CudaRuntime] = None, label: str = ""):
        self.trt = trt
        self.cuda = cuda or CudaRuntime()
        self.runtime = trt.Runtime(logger or trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineRunError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.description = label or f"TensorRT {trt.__version__} engine"

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        allocations: List[int] = []
        stream = self.cuda.stream()
        try:
            for name in self.inputs:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtype(name))
                if not self.context.set_input_shape(name, array.shape):
                    raise EngineRunError(f"input {name!r} of shape {array.shape} is outside the engine's profile")
                allocations.append(self.cuda.malloc(array.nbytes))
                self.cuda.to_device(allocations[-1], array)
                self.context.set_tensor_address(name, allocations[-1])
            results = {}
            for name in self.outputs:
                results[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name))
                allocations.append(self.cuda.malloc(results[name].nbytes))
                self.context.set_tensor_address(name, allocations[-1])
            if not self.context.execute_async_v3(stream):
                raise EngineRunError("execute_async_v3 failed (TensorRT printed why)")
            self.cuda.synchronize(stream)
            for name, pointer in zip(self.outputs, allocations[len(self.inputs):]):
                self.cuda.to_host(results[name], pointer)
            return results
        finally:
            for pointer in allocations:
                self.cuda.free(pointer)
            self.cuda.destroy(stream)

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def attention_layers(self, limit: int = 24) -> Dict[str, object]:
        """What the engine inspector says about attention: layers whose name or tactic mention MHA /
        attention (the build sets detailed profiling verbosity so that tactics are listed)."""
        inspector = self.engine.create_engine_inspector()
        text = inspector.get_engine_information(self.trt.LayerInformationFormat.JSON)
        layers = json.loads(text).get("Layers", [])
        described = [layer if isinstance(layer, str) else json.dumps(layer) for layer in layers]
        matches = [d for d in described if ATTENTION_EVIDENCE.search(d)]
        names = [json.loads(d).get("Name", d) if d.startswith("{") else d for d in matches]
        return {"engine_layers": len(layers), "attention_layers": len(matches),
                "attention_layer_names": [str(n)[:200] for n in names[:limit]]}
