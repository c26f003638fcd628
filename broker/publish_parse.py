"""Where a received PUBLISH packet's payload starts: so that a large one is copied once.

paho parses a PUBLISH with ``struct.unpack`` and slices: each step copies the rest of the
packet, payload included, three or four times for QoS 1 on MQTT 5, two of them alive at
once beside paho's receive buffer. For a 4 MB update that is 12-16 MB copied and up to
three updates' worth of memory per message. ``payload_offset`` reads only the variable
header (topic, packet id, MQTT 5 properties) so that ``broker.connection.Client`` can cut
the payload off in one copy and hand paho the small header to parse as before.

The packet comes from the network: every length is checked against what is there, and
anything odd returns None, leaving the packet to paho (which refuses it as before).
"""

from __future__ import annotations

# below this, paho's own copies cost less than the bookkeeping
LARGE = 64 * 1024


def _varint(packet: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """MQTT's variable byte integer at ``pos``: (value, bytes used), at most 4 bytes."""
    value = 0
    for i in range(4):
        if pos + i >= len(packet):
            return None
        byte = packet[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    return None


def payload_offset(packet: bytes | bytearray, qos: int, mqtt5: bool) -> int | None:
    """The payload's offset in ``packet`` (everything after the fixed header), or None
    when the variable header does not fit in it."""
    if len(packet) < 2:
        return None
    pos = 2 + int.from_bytes(packet[0:2], "big")  # topic name
    if qos > 0:
        pos += 2  # packet identifier
    if mqtt5:
        props = _varint(packet, pos)
        if props is None:
            return None
        length, used = props
        pos += used + length
    return pos if pos <= len(packet) else None
