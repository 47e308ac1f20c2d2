"""The deployment's database, for the commands that work on it directly (`keys`, `models`)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.output import CliError
from core.settings import Settings


@contextmanager
def deployment_transaction(settings: Settings) -> Iterator:
    """A transaction on the LORAJOBS_* settings' database, or a one-line error that says where it looked and what to
    do: the embedded default's database lies under `data_dir`, `./var` from the folder the command runs in, so run
    elsewhere the command would otherwise create an empty database there and fail on its first query."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from db.session import transaction

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        data_dir = settings.data_dir
        where = data_dir if data_dir.is_absolute() else f"./{data_dir}, from the folder this runs in"
        raise CliError(f"no lorajobs database at {Path(url.database).resolve()}: the embedded default keeps it in "
                       f"LORAJOBS_DATA_DIR ({where}); run this where `lorajobs up` runs, or set LORAJOBS_DATA_DIR "
                       f"or LORAJOBS_DATABASE_URL to the service's")
    with transaction(settings.database_url) as session:
        if not inspect(session.connection()).has_table("alembic_version"):
            raise CliError(f"the database {url.render_as_string(hide_password=True)} holds no lorajobs schema: "
                           f"run `lorajobs migrate` first (`lorajobs up` does it itself)")
        yield session
