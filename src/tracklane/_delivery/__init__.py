"""The engine: the buffer callers append to, the worker that drains it, delivery and its outcome rule,
and the journal as the buffer's disk. It knows nothing about runs: run models hold it."""
