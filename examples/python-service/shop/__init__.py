"""The shop: a small Python service as pglock's recipes deploy it.

- `shop.main`: the FastAPI app (`uvicorn shop.main:app`);
- `shop.celery`: the Celery app (`celery --app shop worker`, `celery --app shop beat`);
- `shop.report`: a job run from cron or beat (`python -m shop.report`);
- `shop.healthcheck`: the containers' health checks (`python -m shop.healthcheck app|worker|beat`).

Every part reads the database from DATABASE_URL, the variable `pglock` reads too.
"""
