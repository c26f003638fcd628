"""The contract that device agents and the aggregator share.

Topic tree, message codec, task spec, model zoo, broker configuration and the
mosquitto launcher. Nothing in here knows about rounds or training loops.
"""
