"""The mosquitto ACL of one federation, and the rules for account names.

Devices are covered by ``pattern`` lines (``%u`` is the username, which is the
device id), so adding or removing a device never changes the ACL text:

    device            write updates/<itself>, status/<itself>, secagg/<itself>,
                      receipts/<itself>; read model, state, round, inbox/<itself>, receipts/+
    aggregator        write model, state, aggregator, round, inbox/+; read updates/+,
                      status/+, secagg/+, control
    operator          write control; read state, aggregator

A site's broker (bridged to a root federation, ``upstream=(root, site)``) also
lets its aggregator account read the root's ``model`` and write the root's
``updates/<site>`` and ``status/<site>``, which the bridge carries to the root;
no pattern reaches the root's topic tree, so a site's device cannot.

Patterns apply to every account, so the two service accounts get explicit
``deny`` lines for what the device patterns would otherwise hand them
(mosquitto checks an account's own lines, denials first, before any pattern).
"""

from __future__ import annotations

from broker.errors import ConfigError
from broker.topics import Topics, check_name

AGGREGATOR_USER = "fedmq-aggregator"
OPERATOR_USER = "fedmq-operator"
RESERVED_PREFIX = "fedmq-"


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it may name a device account, else raise ConfigError."""
    try:
        check_name("device id", device_id)
    except ValueError as exc:  # older topics.check_name raised ValueError
        raise ConfigError(str(exc)) from None
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise ConfigError(
            f"device id {device_id!r} is reserved: ids starting with {RESERVED_PREFIX!r} "
            "name fedmq's own accounts"
        )
    return device_id


def render_acl(
    federation: str,
    aggregator_user: str = AGGREGATOR_USER,
    operator_user: str = OPERATOR_USER,
    upstream: tuple[str, str] | None = None,
) -> str:
    """The text of the ``acl_file`` for ``federation``; ``upstream`` is (root federation,
    this site's account there) for a site's broker."""
    t = Topics(federation)
    site_lines: list[str] = []
    if upstream is not None:
        root = Topics(upstream[0])
        if root.base == t.base:
            raise ConfigError(
                f"a site's federation must differ from its root's ({federation!r}): "
                "their topics would collide over the bridge"
            )
        site_lines = [
            f"topic read {root.model}",
            f"topic write {root.update(upstream[1])}",
            f"topic write {root.status(upstream[1])}",
        ]
    update_pattern = f"{t.base}/updates/%u"
    status_pattern = f"{t.base}/status/%u"

    def service(user: str, lines: list[str]) -> list[str]:
        # what the device patterns would give this account under its own name
        denied = [
            f"topic deny {topic}"
            for topic in (t.update(user), t.status(user), t.secagg(user), t.receipt(user))
        ]
        denied.append(f"topic deny {t.inbox(user)}")
        return ["", f"user {user}", *denied, *lines]

    out = [
        f"# fedmq ACL for federation {federation!r}: written by fedmq, edits are overwritten",
        "",
        "# devices (username = device id)",
        f"pattern write {update_pattern}",
        f"pattern write {status_pattern}",
        f"pattern read {t.model}",
        f"pattern read {t.state}",
        "# secure aggregation (broker/secagg/wire.py)",
        f"pattern write {t.base}/secagg/%u",
        f"pattern write {t.base}/receipts/%u",
        f"pattern read {t.base}/inbox/%u",
        f"pattern read {t.round}",
        f"pattern read {t.base}/receipts/+",
    ]
    out += service(
        aggregator_user,
        [
            f"topic readwrite {t.model}",
            f"topic readwrite {t.state}",
            f"topic readwrite {t.aggregator}",
            f"topic read {t.updates_filter}",
            f"topic read {t.status_filter}",
            f"topic readwrite {t.round}",
            f"topic write {t.base}/inbox/+",
            f"topic read {t.secagg_filter}",
            f"topic read {t.control}",
            *site_lines,
        ],
    )
    out += service(
        operator_user,
        [
            f"topic deny {t.model}",
            f"topic write {t.control}",
            f"topic read {t.state}",
            f"topic read {t.aggregator}",
        ],
    )
    return "\n".join(out) + "\n"
