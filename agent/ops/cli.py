"""``edge-agent keys generate``: the operator's key pair for signing control commands.

:func:`agent.cli.build_parser` mounts it with ``add_keys_parser(sub)``. Handlers import the
cryptography package themselves, so ``edge-agent --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_keys_parser"]


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from agent.ops.keys import KeyFileError, generate_key_pair
    try:
        pair = generate_key_pair(args.out, args.key_id)
    except (KeyFileError, FileExistsError) as exc:
        print(f"edge-agent keys generate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-agent keys generate: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"private key {pair.private_path} (0600: keep it with the operator, never on a board)")
    print(f"public key  {pair.public_path} (copy it into each board's keyring directory)")
    print(f"key id {pair.key_id}, fingerprint {pair.fingerprint}")
    return 0


def add_keys_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``keys`` (``keys generate``) to an ``add_subparsers()`` object; returns its parser."""
    keys = subparsers.add_parser("keys", help="make the operator's Ed25519 key pair for signed commands",
                                 description="Key handling for signed control commands (edge-agent ctl).")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = keys_sub.add_parser(
        "generate", help="make a new key pair: DIR/KEY_ID.key (0600) and DIR/KEY_ID.pub",
        description="Make a new Ed25519 key pair: the private key DIR/KEY_ID.key (PKCS#8 PEM, mode 0600), "
                    "for the operator who signs commands, and the public key DIR/KEY_ID.pub, for the boards' "
                    "keyrings. Never overwrites an existing key.")
    generate.add_argument("--out", required=True, metavar="DIR", help="directory for the pair (created 0700 if missing)")
    generate.add_argument("--key-id", metavar="NAME",
                          help="the key's id, also the files' names (default: op- and 12 hex digits of its fingerprint)")
    generate.set_defaults(func=_cmd_keys_generate)
    return keys
