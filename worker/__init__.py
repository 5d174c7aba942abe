"""Worker side of InstructLoop: Celery tasks and the torch code that samples and trains models."""
