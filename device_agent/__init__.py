"""The device side of fedmq: MQTT session, data sources, local trainer.

Depends on ``broker`` only; a device installs and runs it without the aggregator.
"""
