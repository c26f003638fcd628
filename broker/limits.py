"""Size limits shared by the codec and the broker's config (no torch import here)."""

DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024  # bytes; mosquitto's message_size_limit matches
DEFAULT_MAX_HEADER = 1024 * 1024  # bytes of safetensors JSON header
