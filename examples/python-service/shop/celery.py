"""The shop's Celery app: `celery --app shop worker`, `celery --app shop beat`.

The broker is CELERY_BROKER_URL (Redis in docker-compose.yml); the tasks store their results in
the shop's own tables, so no result backend is configured.
"""

import os

from celery import Celery
from celery.schedules import crontab

app = Celery("shop", broker=os.environ["CELERY_BROKER_URL"], include=["shop.tasks"])
app.conf.update(
    timezone="UTC",
    broker_connection_retry_on_startup=True,
    # Exactly one beat runs this schedule: `pglock leader beat -- celery --app shop beat`.
    beat_schedule={
        "nightly-report": {"task": "shop.tasks.make_report", "schedule": crontab(hour=2, minute=0)},
    },
)
