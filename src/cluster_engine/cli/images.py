"""``cluster-engine images …``: the Images API of a running server, from a terminal or a script.

Built on the SDK (``cluster_engine.client``); ``cli/main.py`` registers the ``images`` group. Output is a
table on a terminal and JSON otherwise (``-o`` overrides); errors are one ``error: …`` line on stderr and
an exit code per kind of failure (the table in ``exits.py``; ``SDK_EXITS`` below for the SDK's errors),
so scripts can branch on them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import click
import msgspec
import yaml
from click.shell_completion import CompletionItem

from ..client import (
    AuthError,
    Client,
    ClusterEngineError,
    Conflict,
    Forbidden,
    ImageResp,
    ImageType,
    NotFound,
    Retry,
    ServiceUnavailable,
    TransportError,
    ValidationError,
)
from . import exits

F = TypeVar("F", bound=Callable[..., Any])

# the table's row for each SDK error (the first that matches; any other is exits.ERROR)
SDK_EXITS: tuple[tuple[type[ClusterEngineError], exits.ExitCode], ...] = (
    (ValidationError, exits.INVALID),
    (AuthError, exits.AUTH),
    (Forbidden, exits.AUTH),
    (NotFound, exits.NOT_FOUND),
    (Conflict, exits.CONFLICT),
    (ServiceUnavailable, exits.UNAVAILABLE),
    (TransportError, exits.UNAVAILABLE),
)
FORMATS = ("table", "json", "yaml", "id")
_URL, _TOKEN = "cluster_engine.url", "cluster_engine.token"
_ID_PREFIX = re.compile(r"[0-9a-fA-F-]{1,35}")

HELP = f"""Manage images through a running server's API.

\b
Connect with --url (or $CE_URL) and --token (or $CE_TOKEN), given before
or after the command. Output (-o): a table on a terminal, JSON otherwise;
also yaml, or id (one id per line). IDs may be shortened to a unique prefix.

{exits.help_text()}

\b
Shell completion (bash; zsh_source and fish_source likewise):
  eval "$(_CLUSTER_ENGINE_COMPLETE=bash_source cluster-engine)"
"""


# ------------------------------------------------------------------------------------ connection


def _remember(key: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """Keep --url / --token in ctx.meta (shared by the group and its commands): a value typed on the
    command line wins over one from the environment, wherever it was typed."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        typed = ctx.get_parameter_source(param.name or "") is click.core.ParameterSource.COMMANDLINE
        if value is not None and (typed or key not in ctx.meta):
            ctx.meta[key] = value

    return callback


def _connection_options(command: F) -> F:
    for flag, envvar, key, help_text in (
        ("--token", "CE_TOKEN", _TOKEN, "Bearer token."),
        ("--url", "CE_URL", _URL, "Server URL, e.g. http://127.0.0.1:8080."),
    ):
        command = click.option(
            flag, envvar=envvar, show_envvar=True, expose_value=False, callback=_remember(key), help=help_text
        )(command)
    return command


def _output_option(command: F) -> F:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        default=None,
        help="Output format [default: table on a terminal, else json].",
    )(command)


def _client(ctx: click.Context, **options: Any) -> Client:
    url = ctx.meta.get(_URL)
    if not url:
        fail("no server URL: pass --url or set CE_URL", exits.USAGE)
    try:
        if _on_a_terminal() and "retries" not in options:  # a person waits: say why it is slow
            options["retries"] = Retry(on_retry=_say_retrying)
        return Client(url, ctx.meta.get(_TOKEN), **options)
    except ValueError as exc:
        fail(str(exc), exits.USAGE)


def _on_a_terminal() -> bool:
    return sys.stderr.isatty()


def _say_retrying(delay: float, why: str) -> None:
    reason = f"the server answered {why}" if why.isdigit() else f"the server does not answer ({why})"
    click.echo(f"{reason}; retrying in {delay:.1f} s…", err=True)


def fail(message: str, exit: exits.ExitCode = exits.ERROR) -> NoReturn:
    """End this invocation with one ``error: …`` line on stderr and the table's code ``exit``."""
    raise exits.Failure(exit, f"error: {message}")


def exit_of(error: ClusterEngineError) -> exits.ExitCode:
    return next((exit for kind, exit in SDK_EXITS if isinstance(error, kind)), exits.ERROR)


@contextlib.contextmanager
def _api() -> Iterator[Client]:
    """A client for this invocation; an SDK error becomes a ``Failure``: one stderr line (then one per
    invalid field) and its row of the table."""
    ctx = click.get_current_context()
    try:
        with _client(ctx) as client:
            yield client
    except ClusterEngineError as error:
        status = f" (HTTP {error.status})" if error.status else ""
        message = error.message
        if isinstance(error, AuthError) and not ctx.meta.get(_TOKEN):
            message = "no token: pass --token or set CE_TOKEN"
        details = error.details if isinstance(error, ValidationError) else []
        raise exits.Failure(
            exit_of(error),
            f"error: {message}{status}",
            *(f"  {detail.field}: {detail.reason} (got {detail.originalValue!r})" for detail in details),
        ) from None


def _resolve(client: Client, value: str) -> str:
    """A full image id from an id or a unique prefix of one (as the table shows)."""
    with contextlib.suppress(ValueError):
        return str(uuid.UUID(value))
    if not _ID_PREFIX.fullmatch(value):
        return value  # let the server say what is wrong with it
    prefix = value.lower()
    matches = [str(image.id) for image in client.list_images() if str(image.id).startswith(prefix)]
    if not matches:
        raise NotFound(f"no image id starts with {value!r}", status=None)
    if len(matches) > 1:
        fail(f"id prefix {value!r} is ambiguous: {', '.join(matches)}", exits.USAGE)
    return matches[0]


def _complete_id(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Shell completion of image ids, when the server is configured and answers quickly."""
    try:
        with Client(ctx.meta.get(_URL), ctx.meta.get(_TOKEN), timeout=2.0, retries=0) as client:
            images = client.list_images()
    except (ClusterEngineError, ValueError):  # not configured, or not answering: no suggestions
        return []
    return [CompletionItem(str(i.id), help=i.name) for i in images if str(i.id).startswith(incomplete)]


# ---------------------------------------------------------------------------------------- output


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


HEADERS = ("ID", "NAME", "TYPE", "IDC", "OS", "BOOT", "PRODUCTS")
# A table wider than the terminal takes width from these (column, down to width) in turn, then from
# the same columns down to their headers' width; ID, TYPE and BOOT are never cut.
_SHRINK = ((6, 11), (1, 14), (3, 9), (4, 12), (6, 8), (1, 4), (3, 3), (4, 2))
_GAP = "  "


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(images: Sequence[ImageResp], width: int = 80) -> str:
    """Images as an aligned table no wider than ``width`` (long cells end in …)."""
    rows = [
        (
            str(image.id)[:8],
            image.name,
            image.type.value,
            image.idc,
            f"{image.OSSeries} {image.OSVersion}",
            image.BootMode.value,
            ", ".join(image.supportedProducts),
        )
        for image in images
    ]
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(HEADERS)]
    overflow = sum(widths) + len(_GAP) * (len(widths) - 1) - width
    for column, floor in _SHRINK:
        cut = min(overflow, widths[column] - floor)
        if cut > 0:
            widths[column] -= cut
            overflow -= cut
    lines = [
        _GAP.join(_cell(text, widths[i]).ljust(widths[i]) for i, text in enumerate(row)).rstrip()
        for row in (HEADERS, *rows)
    ]
    return "\n".join(lines)


def _emit(result: ImageResp | list[ImageResp], output: str | None) -> None:
    fmt = output or ("table" if _stdout_is_terminal() else "json")
    images = result if isinstance(result, list) else [result]
    if fmt == "id":
        for image in images:
            click.echo(str(image.id))
    elif fmt == "table":
        if images:
            click.echo(render_table(images, shutil.get_terminal_size((80, 24)).columns))
        else:
            click.echo("No images found.", err=True)
    else:
        data = msgspec.to_builtins(result)
        if fmt == "json":
            click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)


# -------------------------------------------------------------------------------------- commands


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@_connection_options
def images() -> None:
    pass


@images.command(name="list")
@click.option("--idc", default=None, help="Only images in this data center.")
@click.option("--product", default=None, help="Only images that support this product.")
@_output_option
@_connection_options
def list_(idc: str | None, product: str | None, output: str | None) -> None:
    """List the images you may boot: every Public image and your org's Customized ones."""
    with _api() as client:
        _emit(client.list_images(idc=idc, product=product), output)


@images.command()
@click.argument("image_id", metavar="ID", shell_complete=_complete_id)
@_output_option
@_connection_options
def get(image_id: str, output: str | None) -> None:
    """Show one image."""
    with _api() as client:
        _emit(client.get_image(_resolve(client, image_id)), output)


@images.command()
@click.option(
    "-f",
    "--filename",
    "file",
    required=True,
    type=click.File("r", encoding="utf-8"),
    help="The image (an ImageCreateReq) as YAML or JSON; - reads stdin.",
)
@click.option(
    "--type",
    "image_type",
    type=click.Choice(["Public", "Customized"]),
    default=None,
    help="Image type [default: the file's `type`, else Customized]. Public needs images:admin.",
)
@_output_option
@_connection_options
def create(file: Any, image_type: str | None, output: str | None) -> None:
    """Register an image from a file.

    \b
    The file holds the fields of an image, e.g.:
      idc: us-west-1
      orgId: 0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01
      name: my-image
      OSVersion: '24.04'     # quote versions, or YAML reads a number
      ...
    """
    try:
        spec = yaml.safe_load(file)
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"not valid YAML or JSON: {exc}", param_hint="'-f'") from None
    if not isinstance(spec, dict):
        raise click.BadParameter("must hold one image (a mapping of its fields)", param_hint="'-f'")
    with _api() as client:
        _emit(client.create_image(spec, type=ImageType(image_type) if image_type else None), output)


@images.command()
@click.argument("image_id", metavar="ID", shell_complete=_complete_id)
@click.option(
    "-y", "--yes", is_flag=True, help="Do not ask for confirmation (required when not on a terminal)."
)
@_connection_options
def delete(image_id: str, yes: bool) -> None:
    """Delete an image (asks first, unless --yes)."""
    if not yes and not _stdin_is_terminal():
        fail("refusing to delete without --yes: stdin is not a terminal", exits.USAGE)
    with _api() as client:
        image_id = _resolve(client, image_id)
        if not yes:
            image = client.get_image(image_id)
            click.confirm(
                f"Delete {image.type.value} image {image.name} ({image.id}) in {image.idc}?", abort=True
            )
        client.delete_image(image_id)
    click.echo(f"deleted image {image_id}")
