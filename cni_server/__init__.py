"""The node daemon core: the UDS fd-handout server, allocations, the standalone daemon and CLI."""
