"""Webhooks: the loop's public events delivered, signed, to other systems.

Batch completed, model version registered or promoted, run failed: it subscribes to `app.events` and imports
no stage.
"""
