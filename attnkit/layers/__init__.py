"""nn.Modules built on :mod:`attnkit.functional`: parameters plus a forward that calls one kernel."""

from .attend import Attend, GateTap, Tap, WeightsTap
from .channel import CBAM, ChannelAttention, EfficientChannelAttention, NoAttention, SpatialAttention, SqueezeExcite
from .non_local import NonLocalBlock
from .soft import AdditiveAttention, CoverageAttention, LocationAwareAttention, LuongAttention, SoftAttention

__all__ = ["Attend", "GateTap", "Tap", "WeightsTap"]
__all__ += ["CBAM", "ChannelAttention", "EfficientChannelAttention", "NoAttention", "NonLocalBlock", "SpatialAttention"]
__all__ += ["SqueezeExcite"]
from .registry import create_attention, get_attention_class, list_attentions, register_attention  # noqa: E402

__all__ += ["create_attention", "get_attention_class", "list_attentions", "register_attention"]
__all__ += ["AdditiveAttention", "CoverageAttention", "LocationAwareAttention", "LuongAttention", "SoftAttention"]
from .hard import GaussianGlimpse, GlimpseSensor, HardAttention, MovingAverageBaseline, ValueBaseline  # noqa: E402

__all__ += ["GaussianGlimpse", "GlimpseSensor", "HardAttention", "MovingAverageBaseline", "ValueBaseline"]
from .cache import CrossKVCache, KVCache, RingKVCache  # noqa: E402
from .multi_head import MultiHeadAttention  # noqa: E402
from .position import (  # noqa: E402
    ALiBiPosition,
    LearnedPosition,
    PositionEncoding,
    RotaryPosition,
    ShawRelative,
    SinusoidalPosition,
    T5RelativeBias,
)

__all__ += ["KVCache", "MultiHeadAttention", "RingKVCache"]
__all__ += ["CrossKVCache"]
__all__ += ["ALiBiPosition", "LearnedPosition", "PositionEncoding", "RotaryPosition", "ShawRelative"]
__all__ += ["SinusoidalPosition", "T5RelativeBias"]
from .transformer import (  # noqa: E402
    DecoderLayerCache,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ += ["DecoderLayerCache", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder"]
__all__ += ["TransformerEncoderLayer"]
