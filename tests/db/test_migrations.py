"""Alembic is the only thing that builds the schema, on PostgreSQL and SQLite alike."""


from sqlalchemy import create_engine, inspect

from db.migrate import downgrade, upgrade
from db.models import Base
from tests.helpers.database import empty_database

TABLES = {"projects", "api_keys", "dashboard_sessions", "files", "fine_tuning_jobs", "job_events", "checkpoints", "workers", "catalogue_models"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _roundtrip(url: str) -> None:
    upgrade(url)
    assert _tables(url) == TABLES
    downgrade(url, "base")
    assert _tables(url) == set()
    upgrade(url)
    assert _tables(url) == TABLES


def test_upgrade_downgrade_upgrade_on_postgresql(pg_url):
    with empty_database(pg_url, "lorajobs_migrations") as url:
        _roundtrip(url)
        engine = create_engine(url)
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("fine_tuning_jobs")}
        engine.dispose()
        assert {"ix_jobs_project_seq", "ix_jobs_status_lease"} <= indexes


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'lorajobs.db'}")


def test_the_migrations_match_the_models(pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(pg_url)
    upgrade(pg_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []
