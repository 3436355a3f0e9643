"""SAM-2 modules for EVF-SAM2 (hustvl/EVF-SAM `model/segment_anything_2`, Meta's first SAM-2 release).

Written to load upstream's state dicts unchanged and to match SAM-2's numerics; built by
`evfsam.modeling.builder.build_sam2`.
"""
from .hiera import Hiera
from .image_encoder import FpnNeck, ImageEncoder
from .mask_decoder import MASK_SELECTIONS, MULTIMASK_BEST, SINGLE_STABILITY, MaskDecoder
from .memory import CXBlock, Fuser, MaskDownSampler, MemoryAttention, MemoryEncoder
from .position_encoding import PositionEmbeddingSine
from .prompt_encoder import PromptEncoder
from .sam2_base import Sam2Base
from .transformer import TwoWayTransformer

__all__ = [
    "CXBlock", "FpnNeck", "Fuser", "Hiera", "ImageEncoder", "MASK_SELECTIONS", "MULTIMASK_BEST", "MaskDecoder",
    "MaskDownSampler", "MemoryAttention", "MemoryEncoder", "PositionEmbeddingSine", "PromptEncoder",
    "SINGLE_STABILITY", "Sam2Base", "TwoWayTransformer",
]
