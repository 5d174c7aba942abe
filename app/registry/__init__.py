"""Registry, the last stage: model versions, lineage, metrics, promotion and rollback.

Promotion can be gated by a won blind evaluation; the promoted policy samples the next batch, which closes the
loop.
"""
