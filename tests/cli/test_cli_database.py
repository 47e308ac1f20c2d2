"""`lorajobs keys` and `lorajobs models` work on the deployment's database directly: run where that database is
not, they say where they looked and what to do, and leave nothing behind."""

import os
import subprocess
import sys

from tests.helpers.database import empty_database
from tests.stack import ROOT


def lorajobs_in(folder, *args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAJOBS_")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=folder, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_run_outside_the_embedded_services_folder_the_cli_says_where_it_looked(tmp_path):
    model = tmp_path / "ferry-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    for args in (["models", "add", "team/ferry", str(model)], ["models", "list"], ["keys", "list"]):
        result = lorajobs_in(tmp_path, *args)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout + result.stderr == (
            f"lorajobs: no lorajobs database at {tmp_path.resolve()}/var/lorajobs.db: the embedded default keeps it "
            f"in LORAJOBS_DATA_DIR (./var, from the folder this runs in); run this where `lorajobs up` runs, or set "
            f"LORAJOBS_DATA_DIR or LORAJOBS_DATABASE_URL to the service's\n")
    assert not (tmp_path / "var").exists()  # no empty database left where it was asked


def test_an_unmigrated_postgresql_database_asks_for_lorajobs_migrate(pg_url, tmp_path):
    with empty_database(pg_url, "lorajobs_cli") as url:
        refused = lorajobs_in(tmp_path, "keys", "create", "--project", "ferries", LORAJOBS_DATABASE_URL=url)
        assert refused.returncode == 1
        assert refused.stdout + refused.stderr == (f"lorajobs: the database {url} holds no lorajobs schema: run "
                                                   f"`lorajobs migrate` first (`lorajobs up` does it itself)\n")
        assert lorajobs_in(tmp_path, "migrate", LORAJOBS_DATABASE_URL=url).returncode == 0
        created = lorajobs_in(tmp_path, "keys", "create", "--project", "ferries", LORAJOBS_DATABASE_URL=url)
        assert created.returncode == 0 and created.stdout.startswith("lj-"), created.stdout + created.stderr
