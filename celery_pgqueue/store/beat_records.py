"""What the beat schedule's statements take and give: entries, states, leases, outcomes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

MAX_ENTRY_NAME = 255
MAX_TEXT = 255


@dataclass(frozen=True, slots=True)
class EntryDefinition:
    """What ``beat_schedule`` says about one entry, as stored for operators."""

    name: str
    task: str
    schedule: str
    next_run_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EntryState:
    """What the database says about one entry: the leader sends from this."""

    name: str
    enabled: bool
    last_run_at: datetime | None
    total_run_count: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Lease:
    """Leadership of one schedule: valid while ``holder`` and ``fence`` are the row's."""

    beat_name: str
    holder: str
    fence: int
    clock_offset: float
    """The database's clock minus ours, in seconds, measured by this round trip."""
    round_trip: float
    """Seconds the measuring round trip took: the offset is good to half of it."""


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One entry as ``pgqueue schedule list`` shows it."""

    beat_name: str
    name: str
    task: str
    schedule: str
    enabled: bool
    last_run_at: datetime | None
    next_run_at: datetime | None
    total_run_count: int
    last_job_id: UUID | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """Who leads a schedule, and until when (database clock)."""

    beat_name: str
    holder: str
    fence: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    expires_in: float
    """Seconds until the lease lapses (negative: it has, and any beat may take it)."""


class Undo(Exception):
    """Roll a send's transaction back, with the reason."""

    def __init__(self, outcome: Sent) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class Sent(enum.Enum):
    """How a send ended."""

    SENT = "sent"
    FENCED = "fenced"
    """Another process holds the lease now: nothing was written."""
    STALE = "stale"
    """The entry was disabled, removed or advanced since it was read: nothing written."""
