"""TEMPORARY re-export of ``edgefleet.wire`` while the tree moves over (deleted in this change)."""

from edgefleet.wire import *  # noqa: F403
from edgefleet.wire import ChunkRefusal as ChunkError  # noqa: F401
from edgefleet.wire import Vitals as Health  # noqa: F401
from edgefleet.wire.base import MalformedMessageError  # noqa: F401
