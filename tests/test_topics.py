"""The topic tree: building, parsing, filters, shared subscriptions, ACL text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet import topics
from edgefleet.topics import (
    DeviceChannel,
    DeviceTopic,
    GroupTopic,
    TopicError,
    TopicFilter,
    all_devices,
    mosquitto_acl,
    parse,
    shared,
)

SAFE = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def test_device_topics_have_the_documented_spelling() -> None:
    assert str(DeviceTopic.desired("pi-7")) == "edgefleet/v1/devices/pi-7/desired"
    assert str(DeviceTopic.status("pi-7")) == "edgefleet/v1/devices/pi-7/status"
    assert str(DeviceTopic.telemetry("pi-7")) == "edgefleet/v1/devices/pi-7/telemetry"
    assert str(DeviceTopic.chunk_request("pi-7")) == "edgefleet/v1/devices/pi-7/chunks/req"
    assert str(DeviceTopic.chunk_data("pi-7")) == "edgefleet/v1/devices/pi-7/chunks/data"
    assert str(DeviceTopic.facts("pi-7")) == "edgefleet/v1/devices/pi-7/facts"
    assert str(GroupTopic("canary")) == "edgefleet/v1/groups/canary/desired"


@given(SAFE, st.sampled_from(list(DeviceChannel)))
def test_parse_inverts_str_for_device_topics(device: str, channel: DeviceChannel) -> None:
    topic = DeviceTopic(device, channel)
    assert parse(str(topic)) == topic


@given(SAFE)
def test_parse_inverts_str_for_group_topics(group: str) -> None:
    assert parse(str(GroupTopic(group))) == GroupTopic(group)


@pytest.mark.parametrize(
    "bad",
    # "dev\n": Python's ``$`` also matches before a final newline; names are full-matched.
    ["", "a+b", "a#", "a/b", "a\0b", "$sys", "-lead", "sp ace", "x" * 65, "ü", "dev\n"],
)
def test_unsafe_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        DeviceTopic.desired(bad)
    with pytest.raises(TopicError):
        GroupTopic(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "edgefleet/v1/devices/a/unknown",
        "edgefleet/v1/devices/a",
        "edgefleet/v1/devices/+/telemetry",
        "edgefleet/v1/devices/a/b/telemetry",
        "edgefleet/v1/groups/g/status",
        "edgefleet/v2/devices/a/status",
        "other/v1/devices/a/status",
        "edgefleet/v1/groups/g/desired/x",
    ],
)
def test_parse_refuses_topics_outside_the_tree(bad: str) -> None:
    with pytest.raises(TopicError):
        parse(bad)


def test_filters_match_like_mqtt() -> None:
    f = all_devices(DeviceChannel.TELEMETRY)
    assert str(f) == "edgefleet/v1/devices/+/telemetry"
    assert f.matches("edgefleet/v1/devices/d1/telemetry")
    assert not f.matches("edgefleet/v1/devices/d1/status")
    assert not f.matches("edgefleet/v1/devices/d1/telemetry/x")
    hash_filter = TopicFilter("edgefleet/v1/#")
    assert hash_filter.matches("edgefleet/v1/groups/g/desired")
    assert hash_filter.matches("edgefleet/v1")
    assert not TopicFilter("#").matches("$SYS/broker/uptime")


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", "", "a\0", "$share/g/a"])
def test_invalid_filters_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        TopicFilter(bad)


def test_shared_subscription_form() -> None:
    f = shared("ingest", all_devices(DeviceChannel.TELEMETRY))
    assert str(f) == "$share/ingest/edgefleet/v1/devices/+/telemetry"
    with pytest.raises(TopicError):
        shared("in/gest", all_devices(DeviceChannel.TELEMETRY))


def test_acl_gives_devices_only_their_subtree() -> None:
    patterns = topics.device_acl_patterns()
    assert "pattern read edgefleet/v1/devices/%u/desired" in patterns
    assert "pattern read edgefleet/v1/devices/%u/chunks/data" in patterns
    assert "pattern write edgefleet/v1/devices/%u/telemetry" in patterns
    assert "pattern write edgefleet/v1/devices/%u/chunks/req" in patterns
    assert "pattern write edgefleet/v1/devices/%u/status" in patterns
    assert "pattern write edgefleet/v1/devices/%u/facts" in patterns
    assert len(patterns) == len(DeviceChannel)
    text = mosquitto_acl({"pi-1": ["canary", "eu"], "pi-2": []}, server_users=["edgefleet-server"])
    assert "user edgefleet-server\ntopic readwrite edgefleet/v1/#" in text
    assert (
        "user pi-1\ntopic read edgefleet/v1/groups/canary/desired\n"
        "topic read edgefleet/v1/groups/eu/desired" in text
    )
    assert "user pi-2" not in text
    with pytest.raises(TopicError):
        mosquitto_acl({"pi-1": ["bad/group"]})
