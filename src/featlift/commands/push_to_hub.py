"""``featlift push-to-hub RUN_DIR ORG/NAME``: upload a checkpoint with a generated model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ..errors import FeatliftError
from ..fileio import atomic_path
from ..hub import CARD_FILE, check_repo_id, file_sha256, push_checkpoint
from ..model_card import CARD_MARKER, checkpoint_card


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push-to-hub",
        help="upload a checkpoint (a run folder of `featlift train`) to the Hugging Face Hub with a model card",
        description="Checks that the checkpoint loads, writes a model card (README.md with the hub's metadata "
        "header: backbone, layer, facet, weights fingerprint and SHA-256, training data and command, validation "
        "numbers, the results.json of `featlift eval` found in RUN_DIR or given with --results) and uploads "
        "config.json, model.safetensors and README.md in one commit. Log in first (`hf auth login` or HF_TOKEN); "
        "HF_ENDPOINT selects another hub. Load it back with --checkpoint hf-hub:ORG/NAME[@REVISION].",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="checkpoint folder (model.safetensors + config.json)"
    )
    parser.add_argument("repo_id", metavar="ORG/NAME", help="hub repository (created if it does not exist)")
    parser.add_argument(
        "--license",
        default=None,
        help="the card's license (a hub license id, e.g. apache-2.0; default featlift's own, from pyproject.toml)",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (an existing one keeps its visibility)",
    )
    parser.add_argument(
        "--revision", default=None, help="branch to push to (created if missing; default main)"
    )
    parser.add_argument("--commit-message", default=None, help="commit message (default names RUN_DIR)")
    parser.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="a `featlift eval` results.json to add to the card (repeatable; those inside RUN_DIR are found)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write the card (to --card-out) and list the files that would be uploaded; upload nothing",
    )
    parser.add_argument(
        "--card-out",
        default=None,
        metavar="FILE",
        help="where --dry-run writes the card (default RUN_DIR/README.md)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_repo_id(args.repo_id)
    if args.card_out is not None and not args.dry_run:
        raise FeatliftError("--card-out only applies with --dry-run (a push uploads the card it makes)")
    directory, config, card = checkpoint_card(
        args.run_dir, args.repo_id, args.license, args.results, revision=args.revision
    )
    files = [(CONFIG_FILE, directory / CONFIG_FILE), (WEIGHTS_FILE, directory / WEIGHTS_FILE)]
    if args.dry_run:
        card_path = Path(args.card_out) if args.card_out else directory / CARD_FILE
        if card_path.exists() and CARD_MARKER not in card_path.read_text(errors="replace"):
            raise FeatliftError(
                f"{card_path} exists and was not written by featlift push-to-hub; pass --card-out FILE to write "
                "the card elsewhere"
            )
        with atomic_path(card_path) as tmp:
            tmp.write_text(card)
        files.append((CARD_FILE, card_path))
        target = f"{args.repo_id}@{args.revision or 'main'}" + (" (private)" if args.private else "")
        print(f"featlift push-to-hub: dry run, nothing uploaded; would upload to {target}:")
        for name, path in files:
            print(f"  {name}  {path.stat().st_size} bytes  sha256 {file_sha256(path)}  ({path})")
        return 0
    result = push_checkpoint(
        directory,
        args.repo_id,
        card,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(
        f"featlift push-to-hub: uploaded {', '.join(result.files)} to {result.repo_id}@{result.revision}: "
        f"{result.commit_url}\nload it with --checkpoint hf-hub:{result.repo_id}"
        + (f"@{result.revision}" if args.revision else "")
    )
    return 0
