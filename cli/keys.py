"""`lorajobs keys create | list | revoke`: API keys, straight against the database."""

import time

from api.services import projects
from cli.database import deployment_transaction
from cli.output import add_json_flag, emit
from core.settings import get_settings


def register(sub) -> None:
    keys = sub.add_parser("keys", help="Manage API keys.").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="Create a key for a project (created if new); printed once.")
    create.add_argument("--project", required=True)
    create.add_argument("--name", help="A label for the key.")
    create.add_argument("--read-only", action="store_true",
                        help="A key that can only read (GET): for dashboards and monitoring; writes answer 403.")
    create.set_defaults(handler=cmd_create)
    listing = keys.add_parser("list", help="List keys (prefix, project, state).")
    listing.add_argument("--project")
    listing.set_defaults(handler=cmd_list)
    revoke = keys.add_parser("revoke", help="Revoke a key by id or visible prefix.")
    revoke.add_argument("key")
    revoke.set_defaults(handler=cmd_revoke)
    for command in (create, listing, revoke):
        add_json_flag(command)


def cmd_create(args) -> int:
    with deployment_transaction(get_settings()) as session:
        new = projects.create_key(session, args.project, name=args.name, read_only=args.read_only)
    emit(args, {"id": new.row.id, "key": new.key, "project": new.project.name, "read_only": new.row.read_only},
         lambda: f"{new.key}\n# key {new.row.id} for project '{new.project.name}': store it now, it is not shown again.")
    return 0


def cmd_list(args) -> int:
    with deployment_transaction(get_settings()) as session:
        rows = [{"id": key.id, "prefix": key.prefix, "project": project.name, "created_at": int(key.created_at),
                 "state": "revoked" if key.revoked_at else "active", "read_only": bool(key.read_only)}
                for key, project in projects.list_keys(session, args.project)]

    def text() -> str:
        lines = [f"{'ID':<22} {'PREFIX':<13} {'PROJECT':<20} {'CREATED':<20} STATE"]
        for row in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created_at"]))
            state = "active, read-only" if row["state"] == "active" and row["read_only"] else row["state"]
            lines.append(f"{row['id']:<22} {row['prefix'] + '…':<13} {row['project']:<20} {created:<20} {state}")
        return "\n".join(lines)

    emit(args, rows, text)
    return 0


def cmd_revoke(args) -> int:
    with deployment_transaction(get_settings()) as session:
        key = projects.revoke_key(session, args.key)
        revoked = {"id": key.id, "prefix": key.prefix, "state": "revoked"}
    emit(args, revoked, lambda: f"revoked {revoked['id']} ({revoked['prefix']}…)")
    return 0
