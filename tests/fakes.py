"""Test fakes for the rollback ports: an in-memory Target and a sink that can crash."""

from __future__ import annotations

from pydantic import JsonValue

from backout.producers.sink import Headers, InMemoryEventSink, Published
from backout.producers.targets import CasOutcome, CasResult, TargetUnavailable
from backout.schemas.events import JsonMap, RecordImage


class InMemoryTarget:
    """A Target over a dict of records, with a version counter and an outage switch."""

    def __init__(
        self, system: str = "erp", records: dict[str, dict[str, JsonValue]] | None = None
    ) -> None:
        self._system = system
        self.records: dict[str, dict[str, JsonValue]] = {
            k: dict(v) for k, v in (records or {}).items()
        }
        self.versions: dict[str, int] = dict.fromkeys(self.records, 1)
        self.down = False
        self.writes = 0
        """Guarded writes that changed something."""

    @property
    def system(self) -> str:
        return self._system

    def _check(self) -> None:
        if self.down:
            raise TargetUnavailable(f"{self._system}: connection refused")

    def read(self, object_id: str) -> RecordImage:
        self._check()
        fields = self.records.get(object_id)
        if fields is None:
            return RecordImage(exists=False)
        return RecordImage(exists=True, fields=dict(fields), version=self.versions[object_id])

    def compare_and_set(self, object_id: str, expected: JsonMap, desired: JsonMap) -> CasResult:
        live = self.read(object_id)
        if live.exists and all(live.fields.get(k) == v for k, v in desired.items()):
            return CasResult(CasOutcome.ALREADY, live)
        if not live.exists or any(live.fields.get(k) != v for k, v in expected.items()):
            return CasResult(CasOutcome.CONFLICT, live)
        self.records[object_id].update(desired)
        self.versions[object_id] += 1
        self.writes += 1
        return CasResult(CasOutcome.APPLIED, self.read(object_id))

    def delete_if(self, object_id: str, expected: JsonMap) -> CasResult:
        live = self.read(object_id)
        if not live.exists:
            return CasResult(CasOutcome.ALREADY, live)
        if any(live.fields.get(k) != v for k, v in expected.items()):
            return CasResult(CasOutcome.CONFLICT, live)
        del self.records[object_id]
        self.writes += 1
        return CasResult(CasOutcome.APPLIED, RecordImage(exists=False))

    def insert_if_absent(self, object_id: str, fields: JsonMap) -> CasResult:
        live = self.read(object_id)
        if live.exists:
            same = all(live.fields.get(k) == v for k, v in fields.items())
            return CasResult(CasOutcome.ALREADY if same else CasOutcome.CONFLICT, live)
        self.records[object_id] = dict(fields)
        self.versions[object_id] = 1
        self.writes += 1
        return CasResult(CasOutcome.APPLIED, self.read(object_id))


class Crash(BaseException):
    """Simulates the process dying (not an Exception: nothing catches it)."""


class CrashingSink(InMemoryEventSink):
    """An in-memory sink whose process 'dies' at the n-th publish (lost unflushed records)."""

    def __init__(self, *, crash_at: int | None = None) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.calls = 0

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        headers: Headers | None = None,
        confirm: bool = True,
    ) -> Published:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise Crash(f"killed at publish #{self.calls}")
        return super().publish(topic, key, value, headers=headers, confirm=confirm)
