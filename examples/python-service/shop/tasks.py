"""The shop's Celery tasks."""

from sqlalchemy import text

from shop.celery import app
from shop.db import engine


@app.task
def confirm_order(order_id: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE orders SET confirmed_at = now() WHERE id = :id AND confirmed_at IS NULL"),
            {"id": order_id},
        )


@app.task
def make_report() -> None:
    from shop.report import make_report

    make_report()
