"""The app module, as in Django's ``proj/celery.py``."""

from celery import Celery

app = Celery("proj")
app.config_from_object("settings", namespace="CELERY")


@app.task
def greet(name: str) -> str:
    return f"hello {name}"
