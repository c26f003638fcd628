"""fedmq: federated learning for fleets of small devices over MQTT (CLI and demo)."""
