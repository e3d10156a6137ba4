"""``edge-agent keys generate`` (the operator's key pair) and ``edge-agent ctl`` (send a signed command).

:func:`agent.cli.build_parser` mounts them with ``add_keys_parser(sub)`` and ``add_ctl_parser(sub)``.
Handlers import the cryptography package and paho themselves, so ``edge-agent --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_keys_parser", "add_ctl_parser", "parse_command_args"]

#: Where ``edge-agent ctl`` finds the operator's private key when ``--key`` is not given.
KEY_ENV = "EDGE_AGENT_KEY"


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


def parse_command_args(words: list[str]) -> dict:
    """``--card m.json --timeout-s 5 --force`` -> ``{"card": "m.json", "timeout_s": 5, "force": True}``:
    a value is read as JSON where it parses as JSON (numbers, true, null, lists, tables such as
    ``--batching '{"max_batch": 4}'``), else as a string; ``@FILE`` is the file's text (a public key
    for ``rotate-key --public-key @bob.pub``), read here, on the operator's machine."""
    args: dict = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ValueError(f"{word!r}: expected --NAME [VALUE] after the command")
        name = word[2:].replace("-", "_")
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            text = words[i + 1]
            if text.startswith("@") and len(text) > 1:
                try:
                    with open(text[1:], encoding="utf-8") as fh:
                        value = fh.read()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ValueError(f"--{word[2:]} {text}: cannot read {text[1:]}: {exc}") from None
            else:
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text
            i += 2
        else:
            value, i = True, i + 1
        args[name] = value
    return args


def operator_key(args: argparse.Namespace):
    """The operator's signing key, from ``--key`` or ``$EDGE_AGENT_KEY`` (and ``--key-id``), for
    ``ctl`` and ``push-plan``; raises ``KeyFileError`` naming what is missing or wrong."""
    from agent.ops.keys import KeyFileError, load_signing_key
    key_path = args.key or os.environ.get(KEY_ENV)
    if not key_path:
        raise KeyFileError(f"no signing key: give --key PRIVATE_KEY or set ${KEY_ENV}")
    return load_signing_key(key_path, args.key_id)


def _cmd_ctl(args: argparse.Namespace) -> int:
    from agent.ops.ctl import send_command
    from agent.ops.keys import KeyFileError
    from agent.ops.signing import CommandError, sign
    try:
        key = operator_key(args)
        command_args = parse_command_args(args.args)
        command_id = args.command_id or None
        envelope = sign(args.command, command_args, args.device, key, ttl_s=args.ttl, command_id=command_id)
    except (ValueError, KeyFileError, CommandError) as exc:
        print(f"edge-agent ctl: {exc}", file=sys.stderr)
        return 2
    from agent.ops.signing import decode_envelope
    from agent.transport.paho_client import SecurityError
    command, _, _ = decode_envelope(envelope)
    try:
        security = broker_security(args)
    except SecurityError as exc:
        print(f"edge-agent ctl: --{exc.setting.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else (8883 if security.tls else 1883)
    try:
        acks = send_command(args.host, port, args.device, args.command, envelope, command.command_id,
                            timeout_s=args.timeout, security=security)
    except (OSError, TimeoutError) as exc:
        print(f"edge-agent ctl: {exc}", file=sys.stderr)
        return 1
    for ack in acks:
        print(json.dumps(ack, default=str, indent=None if args.compact else 2), flush=True)
    if not acks:
        print(f"edge-agent ctl: no acknowledgement from {args.device!r} within {args.timeout:g} s "
              f"(command id {command.command_id}: send it again with --command-id to retry safely)", file=sys.stderr)
        return 3
    return 0 if all(ack.get("ok") for ack in acks) else 1


def add_broker_security_args(parser: argparse.ArgumentParser) -> None:
    """The broker's TLS and credential options, as ``[mqtt]`` spells them in a config (README,
    "Securing the broker"); :func:`broker_security` turns them into an ``MqttSecurity``."""
    group = parser.add_argument_group("broker security (README, \"Securing the broker\")")
    group.add_argument("--tls", action="store_true", help="TLS to the broker, checked against the system's CAs "
                       "(implied by --tls-ca and --tls-cert); the port then defaults to 8883")
    group.add_argument("--tls-ca", metavar="PEM", help="the CA that signed the broker's certificate")
    group.add_argument("--tls-cert", metavar="PEM", help="this client's certificate (its CN is the identity the "
                       "broker's ACL knows); with --tls-key")
    group.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert (unencrypted PEM)")
    group.add_argument("--tls-insecure", action="store_true", help="do not check the broker's certificate against "
                       "the host name (the chain still is): a lab only")
    group.add_argument("--username", metavar="NAME", help="the broker's username")
    group.add_argument("--password-file", metavar="FILE", help="a file holding the password (first line), only its "
                       "owner may read it (chmod 600)")


def broker_security(args: argparse.Namespace):
    """An ``MqttSecurity`` from :func:`add_broker_security_args`' options, its files checked;
    raises ``SecurityError`` naming the setting."""
    from agent.transport.paho_client import MqttSecurity
    security = MqttSecurity(tls=bool(args.tls or args.tls_ca or args.tls_cert or args.tls_insecure),
                            ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                            insecure=args.tls_insecure, username=args.username, password_file=args.password_file)
    security.check()
    return security


def add_ctl_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ctl`` to an ``add_subparsers()`` object; returns its parser."""
    ctl = subparsers.add_parser(
        "ctl", help="send a signed control command to a board (or the fleet) and print its acknowledgement",
        description="Sign COMMAND with the operator's Ed25519 key and publish it on edge/v1/DEVICE/cmd/COMMAND "
                    "(or edge/v1/fleet/cmd/COMMAND with --device fleet); print each board's acknowledgement as "
                    "JSON. Arguments after COMMAND become its args: --card m.json --timeout-s 5 gives "
                    "{card: 'm.json', timeout_s: 5} (values are JSON where they parse). Exit 0 when every ack "
                    "is ok, 1 when refused, 3 when none came.",
        epilog="examples: edge-agent ctl --device board-1 --key ops.key status;  "
               "edge-agent ctl --device board-1 drain --timeout-s 30;  edge-agent ctl --device fleet resume;  "
               "... load-model --name resnet_digits --card demo:resnet_digits --instances 2 "
               "--batching '{\"max_batch\": 4}';  ... unload-model --model resnet_digits --timeout-s 10;  "
               "... set-batching --model resnet_digits --max-batch 4 --max-wait-ms 2;  "
               "... set-slo-default --all --slo-ms 80;  ... set-policy --policy learned --policy-path policies/cpu-2core;  "
               "... set-offload --share 0.25 --split none;  ... selftest --groups '[\"core\", \"broker\"]';  "
               "... reload-config;  ... rotate-key --key-id bob --public-key @bob.pub --revoke alice")
    ctl.add_argument("--device", required=True, metavar="D", help="the board's device id, or 'fleet' for every board")
    ctl.add_argument("--key", metavar="PRIVATE_KEY", help=f"the operator's private key (edge-agent keys generate; "
                                                          f"default ${KEY_ENV})")
    ctl.add_argument("--key-id", metavar="ID", help="the key's id on the boards (default: the key file's name)")
    ctl.add_argument("--host", default="127.0.0.1", help="MQTT broker (default 127.0.0.1)")
    ctl.add_argument("--port", type=int, default=None, help="MQTT broker port (default 1883, 8883 with TLS)")
    ctl.add_argument("--ttl", type=float, default=60.0, metavar="S",
                     help="seconds the command stays valid (default 60; boards accept at most their max_ttl_s)")
    ctl.add_argument("--timeout", type=float, default=10.0, metavar="S",
                     help="seconds to wait for acknowledgements (default 10; a fleet command always waits this long)")
    ctl.add_argument("--command-id", metavar="ID", help="the command's id (default: a new one); the same id "
                                                        "again returns the first acknowledgement, never a second run")
    ctl.add_argument("--compact", action="store_true", help="one line of JSON per acknowledgement")
    ctl.add_argument("command", metavar="COMMAND", help="status, drain, resume, load-model, unload-model, "
                     "set-batching, set-slo-default, set-policy, set-offload, selftest, reload-config, rotate-key")
    ctl.add_argument("args", nargs=argparse.REMAINDER, metavar="--NAME VALUE", help="the command's args")
    add_broker_security_args(ctl)
    ctl.set_defaults(func=_cmd_ctl)
    return ctl
