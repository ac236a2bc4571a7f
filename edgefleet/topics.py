"""Every MQTT topic edgefleet uses, built and parsed in one place.

Flow: code never formats a topic string by hand. A sender builds a
``DeviceTopic``/``GroupTopic`` (which validates the id) and publishes
``str(topic)``; a receiver hands the incoming topic string to ``parse`` and
gets the same frozen object back, or a ``TopicError``. Subscriptions use
``TopicFilter`` values (wildcards, shared subscriptions), and the broker's
access-control file is generated from the same tree (``mosquitto_acl``).

Topic tree (``v1`` is the protocol version; docs/protocol.md is normative)::

    edgefleet/v1/devices/{device}/desired       server -> device, retained, signed
    edgefleet/v1/groups/{group}/desired         server -> devices, retained, signed
    edgefleet/v1/devices/{device}/status        device -> server, retained (+ last will)
    edgefleet/v1/devices/{device}/telemetry     device -> server
    edgefleet/v1/devices/{device}/chunks/req    device -> server
    edgefleet/v1/devices/{device}/chunks/data   server -> device
    edgefleet/v1/devices/{device}/facts         device -> server, retained

Invariants: device ids and group names match ``NAME_PATTERN`` (ASCII letters,
digits, ``.``, ``_``, ``-``; 1-64 characters; no ``+``, ``#``, ``/``, NUL,
whitespace or leading ``$``), so an id can never widen a subscription, escape
its subtree, or break Mosquitto's ``%u`` ACL substitution. ``parse(str(t)) ==
t`` for every topic ``t``. This module is pure (no paho import).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edgefleet.errors import VerificationError
from edgefleet.ids import NAME_PATTERN, NAME_RE

__all__ = [
    "MAX_TOPIC_BYTES",
    "NAME_PATTERN",
    "PREFIX",
    "DeviceChannel",
    "DeviceTopic",
    "GroupTopic",
    "TopicError",
    "TopicFilter",
    "all_devices",
    "device_acl_patterns",
    "mosquitto_acl",
    "parse",
    "parse_device_topic",
    "shared",
    "validate_device_id",
    "validate_group",
]

PREFIX = "edgefleet/v1"
_NAME_RE = NAME_RE  # device ids and group names (edgefleet.ids.NAME_PATTERN)
_SHARE_GROUP_RE = NAME_RE
MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string limit


class TopicError(VerificationError, ValueError):
    """A topic, filter, device id or group name is not part of the edgefleet tree."""


def _validate_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} is not safe: use 1-64 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_device_id(value: object) -> str:
    """Return ``value`` if it is a safe device id.

    Raises:
        TopicError: not a string matching ``NAME_PATTERN``.
    """
    return _validate_name(value, "device id")


def validate_group(value: object) -> str:
    """Return ``value`` if it is a safe group name.

    Raises:
        TopicError: not a string matching ``NAME_PATTERN``.
    """
    return _validate_name(value, "group name")


class DeviceChannel(str, enum.Enum):
    """The per-device topics, by their suffix below ``devices/{device}/``."""

    DESIRED = "desired"
    STATUS = "status"
    TELEMETRY = "telemetry"
    CHUNK_REQUEST = "chunks/req"
    CHUNK_DATA = "chunks/data"
    FACTS = "facts"

    @property
    def device_publishes(self) -> bool:
        """True for the channels the device writes (the rest it only reads)."""
        return self in _DEVICE_WRITES


_DEVICE_WRITES = frozenset(
    {
        DeviceChannel.STATUS,
        DeviceChannel.TELEMETRY,
        DeviceChannel.CHUNK_REQUEST,
        DeviceChannel.FACTS,
    }
)
_BY_SUFFIX = {c.value: c for c in DeviceChannel}


@dataclass(frozen=True)
class DeviceTopic:
    """``edgefleet/v1/devices/{device_id}/{channel}``."""

    device_id: str
    channel: DeviceChannel

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if not isinstance(self.channel, DeviceChannel):
            raise TopicError(f"unknown device channel {self.channel!r}")

    def __str__(self) -> str:
        return f"{PREFIX}/devices/{self.device_id}/{self.channel.value}"

    @classmethod
    def desired(cls, device_id: str) -> DeviceTopic:
        return cls(device_id, DeviceChannel.DESIRED)

    @classmethod
    def status(cls, device_id: str) -> DeviceTopic:
        return cls(device_id, DeviceChannel.STATUS)

    @classmethod
    def telemetry(cls, device_id: str) -> DeviceTopic:
        return cls(device_id, DeviceChannel.TELEMETRY)

    @classmethod
    def chunk_request(cls, device_id: str) -> DeviceTopic:
        return cls(device_id, DeviceChannel.CHUNK_REQUEST)

    @classmethod
    def chunk_data(cls, device_id: str) -> DeviceTopic:
        return cls(device_id, DeviceChannel.CHUNK_DATA)

    @classmethod
    def facts(cls, device_id: str) -> DeviceTopic:
        return cls(device_id, DeviceChannel.FACTS)


@dataclass(frozen=True)
class GroupTopic:
    """``edgefleet/v1/groups/{group}/desired`` (the only per-group topic)."""

    group: str

    def __post_init__(self) -> None:
        validate_group(self.group)

    def __str__(self) -> str:
        return f"{PREFIX}/groups/{self.group}/desired"


Topic = DeviceTopic | GroupTopic


def parse(topic: str) -> Topic:
    """Parse a concrete topic (no wildcards) of the edgefleet tree.

    Raises:
        TopicError: the topic is not exactly one of the documented forms.
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, not {type(topic).__name__}")
    prefix = PREFIX + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic[:80]!r} is not below {PREFIX}/")
    parts = topic[len(prefix) :].split("/")
    if len(parts) >= 3 and parts[0] == "devices":
        channel = _BY_SUFFIX.get("/".join(parts[2:]))
        if channel is None:
            raise TopicError(f"topic {topic[:120]!r}: unknown device channel")
        return DeviceTopic(validate_device_id(parts[1]), channel)
    if len(parts) == 3 and parts[0] == "groups" and parts[2] == "desired":
        return GroupTopic(validate_group(parts[1]))
    raise TopicError(f"topic {topic[:120]!r} is not an edgefleet topic")


@functools.lru_cache(maxsize=16384)
def parse_device_topic(topic: str) -> DeviceTopic:
    """``parse`` for the topics of one device, memoized (receivers' hot path).

    Every device publishes to the same few topics again and again, and a
    parsed topic is immutable; an invalid topic raises (and is not cached).

    Raises:
        TopicError: not exactly a documented device topic.
    """
    parsed = parse(topic)
    if not isinstance(parsed, DeviceTopic):
        raise TopicError(f"not a device topic: {topic[:120]!r}")
    return parsed


@dataclass(frozen=True)
class TopicFilter:
    """A validated MQTT subscription filter (``+`` and ``#`` wildcards allowed).

    ``share_group`` makes it a shared subscription ``$share/{group}/{filter}``:
    the broker hands each message to one member of the group (server replicas).
    """

    filter: str
    share_group: str | None = None

    def __post_init__(self) -> None:
        f = self.filter
        if not isinstance(f, str) or not f or len(f.encode("utf-8")) > MAX_TOPIC_BYTES:
            raise TopicError("a topic filter must be a non-empty string of at most 65535 bytes")
        if "\0" in f:
            raise TopicError("a topic filter must not contain NUL")
        levels = f.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise TopicError(f"filter {f!r}: '#' must be a whole, last level")
            if "+" in level and level != "+":
                raise TopicError(f"filter {f!r}: '+' must be a whole level")
        if f.startswith("$share/"):
            raise TopicError("pass the share group as share_group, not inside the filter")
        if self.share_group is not None and not _SHARE_GROUP_RE.fullmatch(self.share_group):
            raise TopicError(f"share group {self.share_group!r} is not a safe name")

    def __str__(self) -> str:
        if self.share_group is None:
            return self.filter
        return f"$share/{self.share_group}/{self.filter}"

    def matches(self, topic: str) -> bool:
        """True if a concrete ``topic`` matches this filter (MQTT 5 section 4.7 rules)."""
        if topic.startswith("$") and self.filter[:1] in ("+", "#"):
            return False
        want = self.filter.split("/")
        have = topic.split("/")
        for i, level in enumerate(want):
            if level == "#":
                return True
            if i >= len(have):
                return False
            if level != "+" and level != have[i]:
                return False
        return len(want) == len(have)


def all_devices(channel: DeviceChannel) -> TopicFilter:
    """``edgefleet/v1/devices/+/{channel}``: one channel of every device."""
    return TopicFilter(f"{PREFIX}/devices/+/{channel.value}")


def shared(group: str, topic_filter: TopicFilter) -> TopicFilter:
    """The shared-subscription form of ``topic_filter`` for server replicas.

    Example: ``shared("ingest", all_devices(DeviceChannel.TELEMETRY))`` is
    ``$share/ingest/edgefleet/v1/devices/+/telemetry``.

    Raises:
        TopicError: ``group`` is not a safe name.
    """
    return TopicFilter(topic_filter.filter, share_group=group)


# ------------------------------------------------------------------------ ACLs


def device_acl_patterns() -> list[str]:
    """Mosquitto ``pattern`` lines giving every device (username = device id) its subtree.

    A device may write its status, telemetry, chunk requests and facts, and
    read its desired state and chunk data; nothing else. ``%u`` is the
    authenticated username, which the server provisions equal to the device id
    (Mosquitto refuses the substitution for usernames containing ``+``, ``#``
    or ``/``, and device ids never do).
    """
    lines = []
    for channel in DeviceChannel:
        access = "write" if channel.device_publishes else "read"
        lines.append(f"pattern {access} {PREFIX}/devices/%u/{channel.value}")
    return lines


def mosquitto_acl(
    device_groups: Mapping[str, Sequence[str]],
    *,
    server_users: Iterable[str] = (),
) -> str:
    """A complete Mosquitto ``acl_file``.

    Args:
        device_groups: device id -> the groups it belongs to (read access to
            each group's desired topic).
        server_users: usernames of the server's replicas (read and write on
            the whole ``edgefleet/v1/#`` tree, including shared subscriptions).

    Returns:
        The file's text, ending in a newline.

    Raises:
        TopicError: a device id, group or server username is not a safe name.
    """
    out = ["# generated by edgefleet.topics.mosquitto_acl; do not edit", ""]
    out += device_acl_patterns()
    for user in server_users:
        _validate_name(user, "server username")
        out += ["", f"user {user}", f"topic readwrite {PREFIX}/#"]
    for device, groups in sorted(device_groups.items()):
        validate_device_id(device)
        checked = sorted({validate_group(g) for g in groups})
        if checked:
            out += ["", f"user {device}"]
            out += [f"topic read {GroupTopic(g)}" for g in checked]
    return "\n".join(out) + "\n"
