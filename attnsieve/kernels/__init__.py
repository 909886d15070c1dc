"""Pure tensor kernels: no knowledge of models or methods. Every kernel returns (out, lse)."""

from attnsieve.kernels.block_sparse import BlockSupport, SparseResult, block_grid, block_sparse_attention
from attnsieve.kernels.dense import dense_attention, exact_cells, softmax_with_lse, token_mask
from attnsieve.kernels.local import band_support, local_attention
from attnsieve.kernels.merge import merge, merge_all
from attnsieve.kernels.support_attention import support_attention
from attnsieve.kernels.token_gather import drop_covered, token_gather_attention

__all__ = [
    "BlockSupport",
    "SparseResult",
    "band_support",
    "block_grid",
    "block_sparse_attention",
    "dense_attention",
    "drop_covered",
    "exact_cells",
    "local_attention",
    "merge",
    "merge_all",
    "softmax_with_lse",
    "support_attention",
    "token_gather_attention",
    "token_mask",
]
