"""Fast reading of ActionEvents for the projector. [adapter]

The projector reads every event once and decodes nothing else, so decoding dominates its
cost. Records in Avro single-object encoding with the current ActionEvent schema are
read by the codec's compiled reader straight from the message bytes (no copy of the
body); anything else (Schema Registry framing, older writer schemas, other record types,
garbage) goes through the configured codec, which also raises the DecodeError a dead
letter needs. ``tests/unit/test_projection_reader.py`` holds the two paths equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from backout.schemas import codec as avro
from backout.schemas.avro_fast import READ_ERRORS, read_error
from backout.schemas.errors import DecodeError
from backout.schemas.events import ActionEvent
from backout.schemas.registry import Codec

__all__ = ["ActionReader"]

_HEADER = 10


class ActionReader:
    """Decodes ActionEvents: fast for current single-object records, else by ``codec``."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.header = avro.SINGLE_OBJECT_MAGIC + avro.current_schema(ActionEvent).fingerprint
        self._read = cast(
            Callable[[bytes, int], ActionEvent], avro.compiled(ActionEvent).reader
        )

    def __call__(self, raw: bytes) -> ActionEvent:
        """The event in ``raw``.

        Raises:
            DecodeError: not an ActionEvent this codec can read.
        """
        if raw[:_HEADER] != self.header:
            event: ActionEvent = self.codec.decode(raw, ActionEvent)
            return event
        try:
            return self._read(raw, _HEADER)
        except READ_ERRORS as exc:
            raise DecodeError(f"corrupt ActionEvent body: {read_error(exc)}", raw=raw) from exc
