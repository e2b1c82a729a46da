"""What ``tracklane bench`` measures, shipped with the package so it runs from a wheel anywhere.

``capacity`` is the capacity plan against a user's server; ``figures`` runs the figure modules
(``caller_cost``, ``end_to_end``, ... one module per figure, each runnable with ``python -m``) and
``targets`` judges them. ``harness`` is what the figure modules share, ``sink`` a server that
stores nothing. Nothing here is imported by ``import tracklane``.
"""
