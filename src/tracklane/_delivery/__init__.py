"""The engine: the buffer callers append to, its parts (taker, sender, uploader, waiter) over one
shared state, and the journal as the buffer's disk. It knows nothing about runs: run models hold it.
What a server's reply means is the wire's (``_wire.outcome``), beneath the engine and the stores."""
