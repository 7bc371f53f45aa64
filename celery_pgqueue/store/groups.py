"""Statements on ``job_groups`` and ``job_chord_parts``: saved groups, native chords.

A chord's header tasks each count themselves once, atomically, in the group's row; the
transaction that counts the last one also claims the body (``chord_started_at``), so
the body is published exactly once and no ``celery.chord_unlock`` task polls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.store.expressions import SECOND
from celery_pgqueue.store.tables import job_chord_parts, job_groups, jobs

NO_INDEX = -1  # job_chord_parts.group_index when Celery gives none


@dataclass(frozen=True, slots=True)
class ChordPart:
    """One counted header part, with its job's stored result (None if it has no row)."""

    task_id: UUID
    group_index: int | None
    state: str
    result_json: str | None


def save(conn: sa.Connection, *, group_id: UUID, result: Any) -> None:
    """Store (or replace) a group's result tuple; its chord counter is untouched."""
    insert = pg_insert(job_groups).values(id=group_id, result=result)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_={"result": insert.excluded.result, "updated_at": sa.func.now()},
        )
    )


def get(conn: sa.Connection, *, group_id: UUID) -> str | None:
    """A saved group's result tuple as JSON text, or None."""
    text: str | None = conn.execute(
        sa.select(sa.cast(job_groups.c.result, sa.Text)).where(job_groups.c.id == group_id)
    ).scalar()
    return text


def delete(conn: sa.Connection, *, group_id: UUID) -> int:
    """Remove a group, its chord counter and its counted parts (by cascade)."""
    return conn.execute(sa.delete(job_groups).where(job_groups.c.id == group_id)).rowcount


def set_chord_size(conn: sa.Connection, *, group_id: UUID, size: int) -> None:
    """Record how many header parts the chord waits for.

    Celery calls this just before publishing the last header task, so parts may have
    been counted already: the count stays. A chord that already started its body and
    is applied again (a frozen chord reuses its group id) starts over.
    """
    insert = pg_insert(job_groups).values(id=group_id, chord_size=size)
    rerun = job_groups.c.chord_started_at.is_not(None)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "chord_size": insert.excluded.chord_size,
                "chord_done": sa.case((rerun, 0), else_=job_groups.c.chord_done),
                "chord_added": sa.case((rerun, 0), else_=job_groups.c.chord_added),
                "chord_started_at": None,
                "updated_at": sa.func.now(),
            },
        )
    )


def add_to_chord(conn: sa.Connection, *, group_id: UUID, count: int) -> None:
    """A header task added ``count`` parts (``Task.add_to_chord``) to wait for."""
    insert = pg_insert(job_groups).values(id=group_id, chord_added=count)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "chord_added": job_groups.c.chord_added + insert.excluded.chord_added,
                "updated_at": sa.func.now(),
            },
        )
    )


def count_part(
    conn: sa.Connection, *, group_id: UUID, task_id: UUID, group_index: int | None, state: str
) -> bool:
    """Count one finished header part, once; True for the part that must start the body.

    One statement, so the group row is locked only while it runs (every part of a big
    chord queues on that row). The part's row is the dedupe key (task id and header
    index, as Redis keys it): a part that runs twice (redelivered, or rescued after its
    lease ran out) adds nothing the second time. The counter only ever grows by one,
    so exactly one part moves it onto ``chord_size + chord_added``: that part claims
    the body, recording ``chord_started_at`` in the same update.
    """
    part = (
        pg_insert(job_chord_parts)
        .values(
            group_id=group_id,
            task_id=task_id,
            group_index=NO_INDEX if group_index is None else group_index,
            state=state,
        )
        .on_conflict_do_nothing()
        .returning(job_chord_parts.c.task_id)
        .cte("part")
    )
    counted = sa.select(sa.func.count()).select_from(part).scalar_subquery()
    insert = pg_insert(job_groups).from_select(
        ["id", "chord_done"], sa.select(sa.literal(group_id, PG_UUID(as_uuid=True)), counted)
    )
    g = job_groups.c
    done = g.chord_done + insert.excluded.chord_done
    reaches = sa.and_(
        g.chord_started_at.is_(None),
        g.chord_size.is_not(None),
        done >= g.chord_size + g.chord_added,
    )
    bump = (
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "chord_done": done,
                "chord_started_at": sa.case((reaches, sa.func.now()), else_=g.chord_started_at),
                "updated_at": sa.func.now(),
            },
        )
        .returning(g.chord_done, g.chord_size, g.chord_added, g.chord_started_at)
        .cte("bump")
    )
    claimed = sa.and_(
        counted == 1,
        bump.c.chord_started_at.is_not(None),
        bump.c.chord_done == bump.c.chord_size + bump.c.chord_added,
    )
    return bool(conn.execute(sa.select(claimed).select_from(bump).add_cte(part)).scalar())


def parts(conn: sa.Connection, *, group_id: UUID) -> list[ChordPart]:
    """The counted parts in header order, each with its job's result as JSON text."""
    rows = conn.execute(
        sa.select(
            job_chord_parts.c.task_id,
            job_chord_parts.c.group_index,
            job_chord_parts.c.state,
            sa.cast(jobs.c.result, sa.Text),
        )
        .select_from(job_chord_parts.outerjoin(jobs, jobs.c.id == job_chord_parts.c.task_id))
        .where(job_chord_parts.c.group_id == group_id)
        .order_by(
            job_chord_parts.c.group_index == NO_INDEX,
            job_chord_parts.c.group_index,
            job_chord_parts.c.counted_at,
        )
    )
    return [
        ChordPart(
            task_id=r[0],
            group_index=None if r[1] == NO_INDEX else r[1],
            state=r[2],
            result_json=r[3],
        )
        for r in rows
    ]


def forget_parts(conn: sa.Connection, *, group_id: UUID) -> int:
    """Drop a finished chord's parts; the group row stays as the "started" marker."""
    return conn.execute(
        sa.delete(job_chord_parts).where(job_chord_parts.c.group_id == group_id)
    ).rowcount


def prune(conn: sa.Connection, *, older_than: float, limit: int) -> int:
    """Delete up to ``limit`` groups untouched for ``older_than`` seconds (parts cascade)."""
    victims = (
        sa.select(job_groups.c.id)
        .where(job_groups.c.updated_at < sa.func.now() - sa.literal(older_than) * SECOND)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("victims")
    )
    deleted = (
        sa.delete(job_groups)
        .where(job_groups.c.id == victims.c.id)
        .returning(job_groups.c.id)
        .cte("deleted")
    )
    return int(conn.execute(sa.select(sa.func.count()).select_from(deleted)).scalar_one())
