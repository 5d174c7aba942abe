"""Export, the fourth stage: the labeled data in the formats trainers read.

Demonstrations, comparisons and rankings streamed from one snapshot as JSON Lines or CSV, resumable by cursor.
"""
