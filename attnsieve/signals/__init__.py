"""Attention signals: what a model's attention says, read from attnsieve's own attention function.

Head profiles (retrieval, sink, local mass, entropy per head), the head calibrations of DuoAttention
and RazorAttention, attention-based re-ranking (ICR) and attention-sink calibration (ACT). This tier
runs models (through the integration) and reads the evaluation tasks' prompts; `cache/` and
`methods/` only read what it writes.
"""

from attnsieve.signals.calibration import calibrate_duo, calibrate_razor
from attnsieve.signals.heads import head_profiles, kv_head_scores, metric_grid, retrieval_query_heads, save_heatmaps
from attnsieve.signals.rerank import Ranking, RerankDetails, ndcg_at_k, rerank
from attnsieve.signals.sinks import calibrate_act

__all__ = [
    "Ranking",
    "RerankDetails",
    "calibrate_act",
    "calibrate_duo",
    "calibrate_razor",
    "head_profiles",
    "kv_head_scores",
    "metric_grid",
    "ndcg_at_k",
    "rerank",
    "retrieval_query_heads",
    "save_heatmaps",
]
