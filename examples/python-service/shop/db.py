"""The database, from DATABASE_URL (a SQLAlchemy URL with a synchronous driver, such as
`postgresql+psycopg2://shop:secret@db:5432/shop`)."""

import os

from sqlalchemy import create_engine

engine = create_engine(os.environ["DATABASE_URL"], pool_pre_ping=True)
