"""Pure functions on tensors: the math of attention. No modules, no state.

Layout: ``query (B, H, L, E)``, ``key (B, Hkv, S, E)``, ``value (B, Hkv, S, Ev)`` -> ``(B, H, L, Ev)``.
Mask meaning everywhere: boolean ``True`` = may attend; float masks are added to the scores.
"""

from . import scoring
from ._reference import attention_reference, masked_softmax
from .chunked import chunked_attention, merge_attention
from .decode import decode_attention  # registers "native_decode" and "torch_decode" (KV-cache decoding steps)
from .dense import attention_weights, scaled_dot_product_attention
from .dispatch import (
    AttentionCall,
    Backend,
    BackendChoice,
    available_backends,
    register_backend,
    which_backend,
)
from .hard import HardAttentionResult, baseline_loss, hard_attention, reinforce_loss
from .local import WindowMask, sliding_window_attention
from .mask_args import MaskArgs, MaskLike, normalize_masks
from .mask_blocks import MaskBlocks
from .masked import masked_attention  # registers the "native_mask" backend (any mask object on the C engine)
from .masks import (
    AndMask,
    AttentionMask,
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    DocumentMask,
    MaskMod,
    OrMask,
    PaddingMask,
    SinkMask,
    SlidingWindowMask,
    as_mask,
    causal_mask,
    combine_masks,
    from_flex_block_mask,
    mask_to_bias,
    padding_mask,
    to_flex_block_mask,
)
from .scoring import (
    additive_scores,
    attend,
    concat_scores,
    cosine_scores,
    dot_scores,
    general_scores,
    scaled_dot_scores,
)
from .sparse import (
    bigbird_layout,
    block_sparse_attention,
    fixed_layout,
    local_layout,
    strided_layout,
)

__all__ = [
    "AndMask",
    "AttentionCall",
    "AttentionMask",
    "Backend",
    "BackendChoice",
    "HardAttentionResult",
    "CausalMask",
    "PaddingMask",
    "additive_scores",
    "attend",
    "attention_reference",
    "attention_weights",
    "baseline_loss",
    "available_backends",
    "causal_mask",
    "combine_masks",
    "concat_scores",
    "cosine_scores",
    "dot_scores",
    "general_scores",
    "hard_attention",
    "mask_to_bias",
    "masked_softmax",
    "padding_mask",
    "register_backend",
    "reinforce_loss",
    "scaled_dot_product_attention",
    "scaled_dot_scores",
    "scoring",
    "which_backend",
    "WindowMask",
    "BlockedWindowMask",
    "DocumentMask",
    "MaskBlocks",
    "MaskMod",
    "OrMask",
    "SinkMask",
    "SlidingWindowMask",
    "as_mask",
    "from_flex_block_mask",
    "masked_attention",
    "to_flex_block_mask",
    "sliding_window_attention",
    "BlockSparseMask",
    "bigbird_layout",
    "block_sparse_attention",
    "fixed_layout",
    "local_layout",
    "strided_layout",
    "chunked_attention",
    "merge_attention",
    "decode_attention",
    "MaskArgs",
    "MaskLike",
    "normalize_masks",
]
