"""The ``loramux`` command line: manage adapters and run completions against a loramux server.

    loramux [--url URL] [--api-key KEY] <command> ...    (or LORAMUX_URL / LORAMUX_API_KEY)

Exit status: 0 on success, 1 when the server or the client reports an error, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx
from tqdm import tqdm

from .errors import LoramuxError
from .protocol import DEFAULT_URL
from .sync import LoramuxClient
from .types import AdapterInfo

COLUMNS = ("ID", "KIND", "RANK", "ALPHA", "TARGETS", "SIZE", "RESIDENCY", "PINNED", "IN-FLIGHT", "SERVED")
NUMERIC = {"RANK", "ALPHA", "SIZE", "IN-FLIGHT", "SERVED"}
MAX_TARGETS_WIDTH = 40
SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(n), 0
    while value >= 1024 and unit < len(SIZE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {SIZE_UNITS[unit]}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _targets(info: AdapterInfo) -> str:
    text = ",".join(info.targets) or "-"
    return text if len(text) <= MAX_TARGETS_WIDTH else text[: MAX_TARGETS_WIDTH - 3] + "..."


def _owner(info: AdapterInfo) -> str:
    return "shared" if info.shared else _cell(info.owner)


def adapter_table(adapters: Iterable[AdapterInfo]) -> str:
    """An aligned text table of adapters, with an OWNER column when they belong to more than one owner."""
    adapters = list(adapters)
    with_owner = len({_owner(a) for a in adapters}) > 1
    header = [*COLUMNS, "OWNER"] if with_owner else list(COLUMNS)
    rows = [header]
    for a in adapters:
        row = [a.id, _cell(a.kind), _cell(a.rank), _cell(a.alpha), _targets(a), _size(a.size_bytes), _cell(a.residency),
               _cell(a.pinned), _cell(a.in_flight), _cell(a.requests_served)]
        if with_owner:
            row.append(_owner(a))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = [name in NUMERIC for name in header]

    def line(row: list[str]) -> str:
        cells = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True))
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in rows)


def _out(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


# --- commands ---------------------------------------------------------------------------------------------------


def cmd_upload(c: LoramuxClient, a: argparse.Namespace) -> None:
    bars: list[tqdm] = []  # created on the first chunk, when the body's size is known

    def progress(sent: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=f"upload {a.id}", total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, disable=None))
        bars[0].update(sent - bars[0].n)

    try:
        info = c.upload(a.dir, a.id, overwrite=a.overwrite, shared=a.shared, tenant=a.tenant, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    what = "uploaded" if info.is_new else "already stored (same content)"
    _out(f"{what}: {info.id} rank={_cell(info.rank)} alpha={_cell(info.alpha)} "
         f"size={_size(info.size_bytes)} sha256={_cell(info.sha256)}")


def cmd_list(c: LoramuxClient, a: argparse.Namespace) -> None:
    adapters = c.list_adapters(tenant=a.tenant)
    if a.json:
        _out(json.dumps([x.model_dump(exclude_none=True) for x in adapters], indent=2))
    else:
        _out(adapter_table(adapters) if adapters else "no adapters")


def cmd_show(c: LoramuxClient, a: argparse.Namespace) -> None:
    info = c.get_adapter(a.id, tenant=a.tenant).model_dump(exclude_none=True)
    if a.json:
        _out(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else _cell(value)
        _out(f"{key + ':':<{width + 1}} {shown}")


def cmd_load(c: LoramuxClient, a: argparse.Namespace) -> None:
    info = c.load(a.id, pin=a.pin, tenant=a.tenant)
    state = f" ({info.residency})" if info.residency else ""
    _out(f"loaded {info.id}{state}{', pinned' if a.pin else ''}")


def cmd_evict(c: LoramuxClient, a: argparse.Namespace) -> None:
    c.evict(a.id, tenant=a.tenant)
    _out(f"evicted {a.id} (still stored)")


def cmd_delete(c: LoramuxClient, a: argparse.Namespace) -> None:
    c.delete(a.id, tenant=a.tenant)
    _out(f"deleted {a.id}")


def cmd_models(c: LoramuxClient, a: argparse.Namespace) -> None:
    for m in c.models():
        _out(f"{m.id}  (adapter of {m.parent})" if m.parent else m.id)


def _adapter_weight(text: str) -> tuple[str, float]:
    """ID or ID=WEIGHT (argparse type of --adapter)."""
    adapter_id, sep, weight = text.rpartition("=")
    if not sep:
        return text, 1.0
    try:
        return adapter_id, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected ID or ID=WEIGHT with a number as WEIGHT") from None


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
            "adapters": a.adapter}


def _stream_text(chunks: Iterable[Any]) -> None:
    for chunk in chunks:
        if chunk.text:
            _out(chunk.text, end="")
    _out()


def cmd_complete(c: LoramuxClient, a: argparse.Namespace) -> None:
    if a.stream:
        _stream_text(c.complete_stream(a.model, a.prompt, **_sampling(a)))
    else:
        _out(c.complete(a.model, a.prompt, **_sampling(a)).text)


def cmd_chat(c: LoramuxClient, a: argparse.Namespace) -> None:
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = [*system, {"role": "user", "content": a.message}]
    if a.stream:
        _stream_text(c.chat_stream(a.model, messages, **_sampling(a)))
    else:
        _out(c.chat(a.model, messages, **_sampling(a)).text)


# --- parser ------------------------------------------------------------------------------------------------------


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default if unset)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print tokens as they come")
    p.add_argument("--adapter", action="append", type=_adapter_weight, default=None, metavar="ID[=WEIGHT]",
                   help="compose adapters (repeat the flag; MODEL is then the base model's name), e.g. "
                        "--adapter legal=0.7 --adapter french=0.3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Client of a loramux LoRA inference server.")
    parser.add_argument("--url", default=None, help=f"server URL (env LORAMUX_URL, default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help="bearer key (env LORAMUX_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[LoramuxClient, argparse.Namespace], None], help: str,
                tenant: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        if tenant:
            p.add_argument("--tenant", default=None, help="(admins) act on this tenant's adapters")
        return p

    p = command("upload", cmd_upload, "upload a PEFT adapter directory", tenant=True)
    p.add_argument("dir", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--id", required=True, help="adapter id to store it under")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter with this id and other content")
    p.add_argument("--shared", action="store_true", help="(admins) make it usable by every tenant")

    p = command("list", cmd_list, "list adapters", tenant=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("show", cmd_show, "show one adapter", tenant=True)
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print JSON instead of key: value lines")

    p = command("load", cmd_load, "make an adapter resident now", tenant=True)
    p.add_argument("id")
    p.add_argument("--pin", action="store_true", help="keep it resident")

    p = command("evict", cmd_evict, "drop an adapter from memory (it stays stored)", tenant=True)
    p.add_argument("id")

    p = command("delete", cmd_delete, "delete an adapter from the store", tenant=True)
    p.add_argument("id")

    command("models", cmd_models, "list the base model and the adapters usable as models")

    p = command("complete", cmd_complete, "complete a prompt with an adapter (or the base model)")
    p.add_argument("model", help="adapter id or the base model's served name")
    p.add_argument("prompt")
    _add_sampling(p)

    p = command("chat", cmd_chat, "send one chat message to an adapter (or the base model)")
    p.add_argument("model", help="adapter id or the base model's served name")
    p.add_argument("message")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return e.code if isinstance(e.code, int) else 2
    url = args.url or os.environ.get("LORAMUX_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("LORAMUX_API_KEY") or None
    timeout = httpx.Timeout(args.timeout, connect=min(10.0, args.timeout))
    try:
        with LoramuxClient(url, api_key, timeout=timeout) as client:
            args.fn(client, args)
    except LoramuxError as e:
        sys.stderr.write(f"error: {e.message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
