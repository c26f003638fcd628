"""The server side of fedmq: round state machine, strategies, journal, checkpoints.

Depends on ``broker`` only. Aggregation math lives in pure functions
(``fedavg.py``); the MQTT loop (``service.py``) only decodes, validates, routes
and calls it.
"""
