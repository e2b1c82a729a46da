"""The wire vocabulary both the engine (``_delivery``) and the stores (``_stores``) speak: events and
the log-batch requests they are packed into (``batching``), what a server's reply means
(``outcome``), and a run's end still to be applied (``run_end``). It sits beneath both, so neither
imports the other for it; it imports only the ground (``_exceptions``, ``_limits``)."""
