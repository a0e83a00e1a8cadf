"""bin/keys: the admin API's keys and usage from a shell, on the database itself (the gateway may be stopped).

Bodies are checked by the admin API's own schemas, so a field the API refuses is refused here, named by its option.
Exit codes: 0 done, 2 bad arguments or settings (or a database this gateway cannot use), 1 not found or refused.
"""
import argparse
import json
import os
import sys
import time

DESCRIPTION = ("Manage the gateway's API keys and read its usage, in its database (DATABASE_URL, else gateway.db "
               "in MODELS_DIR), with the gateway running or stopped.")
# What a schema's field is called on this command line, for its error messages.
OPTION_OF = {"name": "NAME", "models": "--models", "rpm": "--rpm", "tpm": "--tpm", "concurrent": "--concurrent",
             "weight": "--weight", "budget.tokens": "--budget-day/--budget-month",
             "budget.requests": "--budget-requests-day/--budget-requests-month", "expires_at": "--expires",
             "grace_s": "--grace", "from": "--from", "to": "--to", "group_by": "--group-by"}
# Budget options: (option, the budget's count, its period).
BUDGET_OPTIONS = (("--budget-day", "tokens", "day"), ("--budget-month", "tokens", "month"),
                  ("--budget-requests-day", "requests", "day"), ("--budget-requests-month", "requests", "month"))
CLEARED = "none"  # an option's value that clears it (the gateway's default applies); --models all


class Refused(Exception):
    """A command the arguments make impossible: its message, and the exit code."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


def default_database_url(settings) -> str:
    """DATABASE_URL, or the one bin/serve fills in: sqlite:/// gateway.db in MODELS_DIR (else models/)."""
    from ..serve import with_local_defaults

    return with_local_defaults(settings)["DATABASE_URL"]


def _count(text):
    if text.lower() == CLEARED:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (or {CLEARED})") from None


def _models(text):
    return None if text.lower() == "all" else [name.strip() for name in text.split(",") if name.strip()]


def _key_options(parser):
    # SUPPRESS: an option not given is absent, so that update changes only what is named.
    given = {"default": argparse.SUPPRESS}
    parser.add_argument("--models", type=_models, help="models the key may use, comma-separated; all: every one",
                        **given)
    for name, what in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                       ("concurrent", "requests at once"), ("weight", "turns per round at the slots")):
        parser.add_argument(f"--{name}", type=_count, metavar="N", help=f"{what}; {CLEARED}: the gateway's default",
                            **given)
    for option, count, per in BUDGET_OPTIONS:
        parser.add_argument(option, type=_count, metavar="N", dest=option[2:].replace("-", "_"),
                            help=f"{count} per UTC {per}", **given)
    parser.add_argument("--no-budget", action="store_true", help="remove the key's budget", **given)
    parser.add_argument("--expires", metavar="WHEN", help=f"ISO-8601 or epoch seconds; {CLEARED}: never", **given)
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON")


def build_parser() -> argparse.ArgumentParser:
    """bin/keys's command line."""
    parser = argparse.ArgumentParser(prog="bin/keys", description=DESCRIPTION,
                                     epilog="Exit codes: 0 done, 1 not found or refused, 2 bad arguments or "
                                     "settings. KEY is a key's id or its name.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = commands.add_parser("create", help="make a key and print its secret, this once")
    create.add_argument("name", metavar="NAME", help="the key's name: its requests' client id")
    _key_options(create)
    listing = commands.add_parser("list", help="every key: stored ones, then the environment's (read-only)")
    listing.add_argument("--json", action="store_true", help="print the admin API's JSON")
    show = commands.add_parser("show", help="one key")
    update = commands.add_parser("update", help="change a key's options (the others stay)")
    update.add_argument("--name", help="a new name", default=argparse.SUPPRESS)
    rotate = commands.add_parser("rotate", help="a new secret; the old one works for --grace seconds more")
    rotate.add_argument("--grace", type=float, default=3600.0, metavar="S", help="seconds (default 3600)")
    revoke = commands.add_parser("revoke", help="refuse the key from now on")
    for command in (show, update, rotate, revoke):
        command.add_argument("key", metavar="KEY")
    for command in (show, rotate, revoke):
        command.add_argument("--json", action="store_true", help="print the admin API's JSON")
    _key_options(update)
    usage = commands.add_parser("usage", help="usage per period, key and model (default: the last 24 h by hour)")
    usage.add_argument("--from", dest="start", metavar="WHEN", help="ISO-8601 or epoch seconds")
    usage.add_argument("--to", dest="end", metavar="WHEN", help="ISO-8601 or epoch seconds (default now)")
    usage.add_argument("--group-by", choices=("hour", "day", "month"), default="hour")
    usage.add_argument("--key", metavar="KEY", help="one key (id or name)")
    usage.add_argument("--model", help="one model")
    usage.add_argument("--csv", action="store_true", help="CSV with a header row")
    return parser


def key_body(options) -> dict:
    """The admin API's JSON body that the options of create or update mean."""
    given = vars(options)
    body = {name: given[name] for name in ("name", "models", "rpm", "tpm", "concurrent", "weight") if name in given}
    if "expires" in given:
        body["expires_at"] = None if given["expires"].lower() == CLEARED else given["expires"]
    budget = {}
    for option, count, per in BUDGET_OPTIONS:
        value = given.get(option[2:].replace("-", "_"))
        if value is not None:
            if budget.get("per", per) != per:
                raise Refused("a key's budget counts one period: day or month, not both")
            budget.update({count: value, "per": per})
    if given.get("no_budget"):
        if budget:
            raise Refused("--no-budget and a budget option: choose one")
        body["budget"] = None
    elif budget:
        body["budget"] = budget
    return body


def checked(schema, body) -> dict:
    """body loaded by the admin API's schema; a refusal names the option."""
    from marshmallow import ValidationError

    from ..schemas import first_error

    try:
        return schema.load(body)
    except ValidationError as error:
        param, message = first_error(error.messages)
        raise Refused(f"{OPTION_OF.get(param, param)}: {message}") from None


def key_id(store, text) -> str:
    """The id of the key text names (its id, or its name); a key of the environment is read-only."""
    if text.startswith("env:"):
        raise Refused(f"{text} is set by OPENAI_API_KEY/OPENAI_API_KEYS: change it in the environment", 1)
    if store.keys.get(text) is not None:
        return text
    return next((key.id for key in store.keys.list() if key.name == text), text)


def run(options, store, settings) -> None:
    """Carry out the command options name, printing its outcome."""
    from ..api.admin_usage import usage_query, usage_rows
    from ..policy.auth import KeyRing
    from ..schemas.admin_keys import KeyCreateSchema, KeyFieldsSchema, RotateSchema, store_fields
    from .errors import KeyNotFound

    clients = KeyRing.from_settings(settings).client_ids
    now = time.time()
    if options.command == "usage":
        query = {"from": options.start, "to": options.end, "group_by": options.group_by, "key": options.key,
                 "model": options.model}
        query = usage_query({name: value for name, value in query.items() if value is not None}, now)
        return print_usage(usage_rows(store, clients, query), options.csv)
    if options.command == "list":
        return print_keys(store, settings, clients, now, options.json)
    if options.command == "create":
        fields = store_fields(checked(KeyCreateSchema(), key_body(options)))
        if fields["name"] in clients:
            raise Refused(f"'{fields['name']}' is the client id of a key in OPENAI_API_KEY/OPENAI_API_KEYS", 1)
        key, secret = store.keys.create(fields.pop("name"), **fields)
        return print_key(store, key, now, options.json, secret=secret)
    found = key_id(store, options.key)
    if store.keys.get(found) is None:
        raise KeyNotFound(f"no key has the id or name {options.key!r} (bin/keys list shows them)")
    if options.command == "show":
        return print_key(store, store.keys.get(found), now, options.json)
    if options.command == "update":
        fields = store_fields(checked(KeyFieldsSchema(), key_body(options)))
        if fields.get("name") in clients:
            raise Refused(f"'{fields['name']}' is the client id of a key in OPENAI_API_KEY/OPENAI_API_KEYS", 1)
        key = store.keys.update(found, **fields) if fields else store.keys.get(found)
        return print_key(store, key, now, options.json)
    if options.command == "rotate":
        grace_s = checked(RotateSchema(), {"grace_s": options.grace})["grace_s"]
        key, secret = store.keys.rotate(found, grace_s)
        return print_key(store, key, now, options.json, secret=secret, old_until=now + grace_s)
    return print_key(store, store.keys.revoke(found), now, options.json)


def main(argv=None) -> int:
    """bin/keys: run one command on the gateway's database; return its exit code."""
    from dotenv import load_dotenv

    from ..config import ConfigError, load_settings
    from ..errors import ApiError
    from ..paths import PROJECT_ROOT
    from . import StoreError, open_store

    options = build_parser().parse_args(argv)
    load_dotenv(os.path.join(PROJECT_ROOT, ".env"), override=False)
    try:
        settings = load_settings(os.environ)
        store = open_store(default_database_url(settings))
    except (ConfigError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        run(options, store, settings)
    except Refused as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except ApiError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2 if error.status == 400 else 1
    finally:
        store.close()
    return 0


def _table(headers, rows) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in (headers, *rows))


def _budget_text(budget) -> str:
    if budget is None:
        return "none"
    counts = " + ".join(f"{budget[count]} {count}" for count in ("tokens", "requests") if budget[count] is not None)
    return f"{counts} per {budget['per']}"


def _when(epoch) -> str:
    from ..schemas.admin_keys import iso

    return "never" if epoch is None else iso(epoch)


def key_line(shown) -> list:
    """A key's row of bin/keys list."""
    limits = ["default" if shown[name] is None else shown[name] for name in ("rpm", "tpm", "concurrent", "weight")]
    return [shown["id"], shown["name"], shown["prefix"] or "-", ",".join(shown["models"] or ["all"]), *limits,
            _budget_text(shown["budget"]), _when(shown["expires_at"]), shown["status"], shown["source"]]


KEY_HEADERS = ["ID", "NAME", "PREFIX", "MODELS", "RPM", "TPM", "CONCURRENT", "WEIGHT", "BUDGET", "EXPIRES", "STATUS",
               "SOURCE"]


def print_key(store, key, now, as_json, secret=None, old_until=None) -> None:
    """Print one stored key (and its new secret, once), as a table's row and its budget's spending, or JSON."""
    from ..api.admin_keys import shown_key

    shown = shown_key(store, key, now)
    if as_json:
        extra = {"key": secret} if secret else {}
        if old_until is not None:
            extra["old_key_valid_until"] = old_until
        print(json.dumps({"id": key.id, **extra, **shown}, indent=2))
        return
    print(_table(KEY_HEADERS, [key_line(shown)]))
    budget = shown["budget"]
    if budget and "spent_tokens" in budget:
        print(f"spent this {budget['per']}: {budget['spent_tokens']} tokens, {budget['spent_requests']} requests "
              f"(resets {_when(budget['resets_at'])})")
    if secret:
        print(f"secret: {secret}")
        print("Keep it now: it is shown this once (the database holds only its digest).")
    if old_until is not None:
        print(f"The old secret works until {_when(old_until)}.")


def print_keys(store, settings, clients, now, as_json) -> None:
    """Print every key: the stored ones, then the environment's (read-only)."""
    from ..api.admin_keys import shown_key
    from ..schemas.admin_keys import environment_key

    overrides = settings["RATE_LIMITS"] or {}
    shown = [shown_key(store, key, now) for key in store.keys.list()]
    shown += [environment_key(client, overrides.get(client, {})) for client in clients]
    if as_json:
        print(json.dumps({"object": "list", "data": shown}, indent=2))
    elif not shown:
        print("no keys (bin/keys create NAME makes one)")
    else:
        print(_table(KEY_HEADERS, [key_line(key) for key in shown]))


def print_usage(rows, as_csv) -> None:
    """Print usage rows as a table, or CSV with a header row."""
    from ..api.admin_usage import COLUMNS, usage_csv

    if as_csv:
        sys.stdout.write(usage_csv(rows).replace("\r\n", "\n"))
    elif not rows:
        print("no usage in this period")
    else:
        print(_table([column.upper() for column in COLUMNS], [[row.get(column) for column in COLUMNS]
                                                            for row in rows]))
