"""Start the MLflow tracking server with its stores and basic-auth config built from the environment.

Used as the entrypoint of the compose stack's MLflow container:

    python entrypoint.py mlflow server --app-name basic-auth --artifacts-destination s3://... ...

Before exec'ing the command it is given, it

* builds the tracking-store URI from POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_HOST /
  POSTGRES_PORT / MLFLOW_DB_NAME (user and password URL-quoted, so any password works) and passes it
  to `mlflow server` through MLFLOW_BACKEND_STORE_URI, which the CLI reads like --backend-store-uri;
  the password therefore never appears on a command line or in `ps`;
* renders basic_auth.ini (next to this file, or MLFLOW_AUTH_CONFIG_TEMPLATE) with the URI of the
  auth database (MLFLOW_AUTH_DB_NAME) into MLFLOW_AUTH_CONFIG_PATH, readable by this user only;
* refuses to start, naming the variables, when a required setting is missing.

The admin account comes from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow
reads itself on first start; no credential is written to the template or to the image.
"""

from __future__ import annotations

import configparser
import os
import string
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from urllib.parse import quote

TEMPLATE = Path(__file__).resolve().with_name("basic_auth.ini")
DEFAULT_CONFIG_PATH = "/tmp/mlflow-auth/basic_auth.ini"
REQUIRED = (
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


class SetupError(RuntimeError):
    """A missing or invalid setting; the message names it and never shows a secret's value."""


def postgres_uri(database: str, env: Mapping[str, str]) -> str:
    """SQLAlchemy URI of one Postgres database (psycopg2 driver), user and password quoted for a URL."""
    user = quote(env["POSTGRES_USER"], safe="")
    password = quote(env["POSTGRES_PASSWORD"], safe="")
    host = env.get("POSTGRES_HOST") or "postgres"
    port = env.get("POSTGRES_PORT") or "5432"
    if not port.isdigit():
        raise SetupError(f"POSTGRES_PORT must be a port number, got {port!r}")
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{quote(database, safe='')}"


def render_auth_config(template: str, database_uri: str) -> str:
    """The template with its database_uri filled in, escaped for configparser's `%` interpolation."""
    try:
        text = string.Template(template).substitute(MLFLOW_AUTH_DATABASE_URI=database_uri.replace("%", "%%"))
    except (KeyError, ValueError) as exc:
        raise SetupError(f"auth config template has an unknown or malformed placeholder: {exc}") from None
    parser = configparser.ConfigParser()
    parser.read_string(text)
    if parser["mlflow"]["database_uri"] != database_uri:
        raise SetupError("rendered auth config does not read back the database_uri it was given")
    return text


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 (parent created 0700), replacing any earlier copy."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def prepare(env: MutableMapping[str, str]) -> None:
    """Check the settings, render the auth config and put the store URIs into `env` (os.environ)."""
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise SetupError(
            "missing required environment variables: " + ", ".join(missing)
            + " (set them in infra/.env; see infra/README.md)"
        )
    tracking_db = env.get("MLFLOW_DB_NAME") or "mlflow"
    auth_db = env.get("MLFLOW_AUTH_DB_NAME") or "mlflow_auth"
    env["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(tracking_db, env)
    template = Path(env.get("MLFLOW_AUTH_CONFIG_TEMPLATE") or TEMPLATE)
    config_path = Path(env.get("MLFLOW_AUTH_CONFIG_PATH") or DEFAULT_CONFIG_PATH)
    write_private(config_path, render_auth_config(template.read_text(), postgres_uri(auth_db, env)))
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(config_path)


def main(argv: Sequence[str]) -> None:
    if not argv:
        sys.exit("usage: entrypoint.py COMMAND [ARGS...]   (e.g. mlflow server --app-name basic-auth ...)")
    try:
        prepare(os.environ)
    except SetupError as exc:
        sys.exit(f"mlflow entrypoint: {exc}")
    os.execvp(argv[0], list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
