"""sparse-topk for torch: the adapter lands with its own issue.

Until then importing it raises an actionable ImportError rather than
offering operators without gradients.
"""

raise ImportError(
    "topk_torch is not implemented yet in this version of sparse-topk; use topk_numpy or topk_core for now"
)
