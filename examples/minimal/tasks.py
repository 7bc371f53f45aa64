"""Ordinary Celery tasks: nothing here knows about PostgreSQL."""

from celery import Celery

app = Celery("minimal")
app.config_from_object("celeryconfig")


@app.task
def add(x: int, y: int) -> int:
    return x + y
