"""InstructLoop: the web side of the loop (pages, JSON API, services) and the shared data model."""
