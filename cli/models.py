"""`lorajobs models list | add ID PATH | install-smollm2`: the local model catalogue."""

from pathlib import Path

from core.catalogue import add_model, list_models
from core.errors import LorajobsError
from core.settings import get_settings


def register(sub) -> None:
    models = sub.add_parser("models", help="The catalogue of base models.").add_subparsers(
        dest="models_command", required=True
    )
    listing = models.add_parser("list", help="List the base models in the catalogue.")
    listing.set_defaults(handler=cmd_list)
    add = models.add_parser("add", help="Register a local Hugging Face model folder under an id.")
    add.add_argument("id", help="Catalogue id, ORG/NAME or NAME.")
    add.add_argument("path", type=Path, help="A Hugging Face model folder (with config.json).")
    add.add_argument("--link", action="store_true", help="Symlink the folder instead of copying it.")
    add.set_defaults(handler=cmd_add)
    install = models.add_parser("install-smollm2", help="Convert the bundled SmolLM2-135M-Instruct GGUF into the catalogue.")
    install.set_defaults(handler=cmd_install_smollm2)
    for parser in (listing, add, install):
        parser.add_argument("--models-dir", type=Path, default=None, help="Catalogue folder (LORAJOBS_MODELS_DIR).")


def _models_dir(args) -> Path:
    return args.models_dir or get_settings().models_dir


def cmd_list(args) -> int:
    found = list_models(_models_dir(args))
    if not found:
        print(f"No models in {_models_dir(args)}; try `lorajobs models install-smollm2`.")
    for model in found:
        print(f"{model.id}\t{model.architecture or '-'}\t{model.path}")
    return 0


def cmd_add(args) -> int:
    try:
        model = add_model(_models_dir(args), args.id, args.path, link=args.link)
    except LorajobsError as error:
        print(f"lorajobs: {error.message}")
        return 1
    print(f"Added {model.id} ({model.architecture or 'unknown architecture'}) at {model.path}")
    return 0


def cmd_install_smollm2(args) -> int:
    from worker.catalogue import install_smollm2

    print(f"Installed at {install_smollm2(_models_dir(args))}")
    return 0
