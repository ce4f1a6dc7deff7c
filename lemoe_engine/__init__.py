"""lemoe-engine: lifelong model editing with LEMoE, served by fused Triton kernels."""

from .config import LEMoEConfig
from .errors import AdaptorError, ConfigError, EditDataError, LEMoEError, UnsupportedModelError
from .layer import LEMoELayer
from .patching import adaptors_disabled, attach, detach, find_layer, query_mask
from .storage import load, save

__version__ = "0.1.0"

__all__ = [
    "LEMoEConfig", "LEMoELayer", "attach", "detach", "find_layer", "load", "save",
    "query_mask", "adaptors_disabled",
    "LEMoEError", "ConfigError", "UnsupportedModelError", "AdaptorError", "EditDataError",
]
