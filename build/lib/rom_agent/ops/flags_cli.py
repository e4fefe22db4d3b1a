"""`rom-agent flags get|set|unset`: read and change a running service's runtime flags.

Values are sent as typed on the command line (`MAX_QUEUE=20`); the service parses them with the
environment's rules, so the CLI never needs to know a flag's type. Exit status: 0 done, 1 the
call failed (the server's message is printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from rom_agent.ops.client import DEFAULT_URL, AdminClient, ApiCallError, is_local_or_tls

_USAGE_ERROR = 2
_CALL_FAILED = 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flags` to the `rom-agent` command parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("ROM_AGENT_URL", DEFAULT_URL),
        help=f"service base URL (default: $ROM_AGENT_URL or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        help="admin token (default: $ADMIN_TOKEN; prefer the variable — arguments are "
        "visible in process lists and shell history)",
    )
    common.add_argument("--json", action="store_true", help="print the JSON answer")

    flags = commands.add_parser("flags", help="read and change runtime flags of a service")
    actions = flags.add_subparsers(dest="flags_command", required=True)
    get = actions.add_parser("get", parents=[common], help="show flags, or one flag")
    get.add_argument("key", nargs="?", help="e.g. ENABLE_CIRCUIT_BREAKER")
    get.set_defaults(handler=_run(_get))
    set_ = actions.add_parser("set", parents=[common], help="change flags at runtime")
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    set_.set_defaults(handler=_run(_set))
    unset = actions.add_parser(
        "unset", parents=[common], help="drop a runtime override (back to env/default)"
    )
    unset.add_argument("key")
    unset.set_defaults(handler=_run(_unset))


Command = Callable[[AdminClient, argparse.Namespace], int]


def _run(command: Command) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        token = args.token or os.environ.get("ADMIN_TOKEN")
        if not token:
            return _fail("no admin token: set ADMIN_TOKEN or pass --token", _USAGE_ERROR)
        try:
            client = AdminClient(args.url, token)
        except ValueError as exc:
            return _fail(str(exc), _USAGE_ERROR)
        _warn_if_plain_http(args.url)
        try:
            return command(client, args)
        except ApiCallError as exc:
            return _fail(str(exc), _CALL_FAILED)

    return handler


def _get(client: AdminClient, args: argparse.Namespace) -> int:
    view = client.get_flags()
    if args.key is None:
        if args.json:
            _print_json(view)
        else:
            _print_table(view, list(view["flags"]))
            print(f"\nupdated at {view['updatedAt']}")
        return 0
    key = args.key.upper()
    if key not in view["flags"]:
        return _fail(f"unknown flag {key}", _CALL_FAILED)
    if args.json:
        _print_json({"key": key, "value": view["flags"][key], "source": view["sources"][key]})
    else:
        _print_table(view, [key])
    return 0


def _set(client: AdminClient, args: argparse.Namespace) -> int:
    changes: dict[str, str] = {}
    for assignment in args.assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            return _fail(f"expected KEY=VALUE, got {assignment!r}", _USAGE_ERROR)
        changes[key.strip()] = value
    result = client.set_flags(changes)
    _print_result(result, args.json)
    return 0


def _unset(client: AdminClient, args: argparse.Namespace) -> int:
    result = client.unset_flag(args.key)
    _print_result(result, args.json)
    return 0


# ---------------------------------------------------------------------- output


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    changed = result["changed"]
    width = max(len(key) for key in changed)
    for key, change in changed.items():
        source = result["sources"].get(key, "?")
        old, new = _shown(change["old"]), _shown(change["new"])
        print(f"{key:<{width}}  {old} -> {new}  (now {source})")


def _print_table(view: dict[str, Any], keys: Sequence[str]) -> None:
    rows = [(key, _shown(view["flags"][key]), view["sources"][key]) for key in keys]
    header = ("KEY", "VALUE", "SOURCE")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(2)]
    for key, value, source in (header, *rows):
        print(f"{key:<{widths[0]}}  {value:<{widths[1]}}  {source}")


def _shown(value: Any) -> str:
    """A value as an environment variable would hold it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _print_json(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _fail(message: str, status: int) -> int:
    print(f"rom-agent flags: {message}", file=sys.stderr)
    return status


def _warn_if_plain_http(url: str) -> None:
    if not is_local_or_tls(url):
        host = urllib.parse.urlsplit(url).hostname
        print(
            f"rom-agent flags: warning: sending the admin token to {host} over plain HTTP",
            file=sys.stderr,
        )
