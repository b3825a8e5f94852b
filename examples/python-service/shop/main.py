"""The shop's web app: `uvicorn shop.main:app` (an ASGI app: under gunicorn, use
`gunicorn --worker-class uvicorn.workers.UvicornWorker shop.main:app`)."""

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session

from shop.db import engine
from shop.models import Order
from shop.tasks import confirm_order

app = FastAPI(title="shop")


class NewOrder(BaseModel):
    item: str


@app.get("/healthz")
def healthz() -> dict:
    """Healthy when the database answers."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return {"status": "ok"}


@app.post("/orders", status_code=201)
def create_order(new: NewOrder) -> dict:
    """Stores an order; a worker confirms it."""
    with Session(engine) as session, session.begin():
        order = Order(item=new.item)
        session.add(order)
        session.flush()
        order_id = order.id
    confirm_order.delay(order_id)
    return {"id": order_id}
