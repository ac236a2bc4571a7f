"""Device status and facts: the two retained messages a device keeps on the broker.

Flow: on every connect the agent publishes its ``DeviceFactsMessage``
(hardware and software, matched against bundle targets) and a
``StatusMessage`` with ``online``; it publishes a new status after every
update step, and the broker publishes the ``offline`` last will (set at
connect) when the connection dies without a DISCONNECT. Both are canonical
JSON, decoded with ``decode_canonical``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from edgefleet import canonical
from edgefleet.ids import Count, DeviceName, UnixTs, Version
from edgefleet.manifest import DeviceFacts
from edgefleet.wire.base import WireStruct, decode_canonical, wire_default
from edgefleet.wire.desired import ModelRef
from edgefleet.wire.telemetry import UpdateEvent

__all__ = ["MAX_SMALL_BYTES", "DeviceFactsMessage", "StatusMessage"]

MAX_SMALL_BYTES = 16 << 10  # bytes; status and facts

Short = Annotated[str, Meta(max_length=32)]


class _StatusType(WireStruct, frozen=True, kw_only=True, rename={"msg_type": "type"}):
    msg_type: Literal["status"] = wire_default("type", "status")


class StatusMessage(_StatusType, frozen=True):
    """Retained device status: online/offline plus the latest update step."""

    what = "status"
    device_id: DeviceName
    state: Literal["online", "offline"]
    ts: UnixTs
    agent_version: Short | None = wire_default("agent_version", None)
    model: ModelRef | None = wire_default("model", None)
    desired_version: Version | None = wire_default("desired_version", None)
    update: UpdateEvent | None = wire_default("update", None)

    STATES = ("online", "offline")

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> StatusMessage:
        """Parse a status payload.

        Raises:
            MalformedMessageError: oversized or malformed.
        """
        return decode_canonical(data, cls, cls.what, MAX_SMALL_BYTES)


class _FactsType(WireStruct, frozen=True, kw_only=True, rename={"msg_type": "type"}):
    msg_type: Literal["facts"] = wire_default("type", "facts")


class DeviceFactsMessage(_FactsType, frozen=True):
    """Retained hardware and software facts, published on every connect."""

    what = "facts"
    device_id: DeviceName
    device_class: DeviceName
    arch: Annotated[str, Meta(max_length=64)]
    ram_bytes: Count | None
    cpu_count: Annotated[int, Meta(ge=1, le=1 << 16)] | None
    onnxruntime_version: Short | None
    agent_version: Short
    max_opset: Annotated[int, Meta(ge=1, le=1000)] | None
    python_version: Short
    os: Annotated[str, Meta(max_length=128)]

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    def to_device_facts(self) -> DeviceFacts:
        """The subset matched against a bundle's targets."""
        return DeviceFacts(
            device_class=self.device_class,
            arch=self.arch,
            agent_version=self.agent_version,
            onnxruntime_version=self.onnxruntime_version,
            max_opset=self.max_opset,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceFactsMessage:
        """Parse a facts payload.

        Raises:
            MalformedMessageError: oversized or malformed.
        """
        return decode_canonical(data, cls, cls.what, MAX_SMALL_BYTES)
