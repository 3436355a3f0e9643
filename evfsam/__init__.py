"""EVF-SAM (Early Vision-Language Fusion for text-prompted Segment Anything) for serving.

`evfsam.specs`, `processing`, `tokenization`, `embedding_cache` and `model_config` need only numpy,
OpenCV, Pillow and `tokenizers`, so the Triton python-backend models import them without torch.  `evfsam.modeling`,
`evfsam.checkpoint` and `evfsam.pipeline` are the PyTorch side (export and reference).
"""
