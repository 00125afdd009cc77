"""The adapter upload form (multipart `id`, `config`, `weights`, `shared`), parsed while the body streams in."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters_store.format import PICKLE_SUFFIXES
from server.api.errors import APIError

# The request body, for the OpenAPI schema (the handler parses it itself, as it streams in).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["id", "config", "weights"],
                    "properties": {
                        "id": {"type": "string", "description": "adapter id: 1-128 of A-Z a-z 0-9 . _ -"},
                        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                        "weights": {"type": "string", "format": "binary",
                                    "description": "adapter_model.safetensors"},
                        "shared": {"type": "boolean", "description": "admins: store in the shared namespace"},
                    },
                }
            }
        },
    }
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass
class UploadForm:
    id: str
    config: bytes
    weights: bytes
    shared: bool


async def read_upload_form(request: Request) -> UploadForm:
    """Parse the upload as it streams in (BodyLimitMiddleware caps its size); 400/422 for a malformed form."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise APIError(400, f"expected a multipart/form-data body with fields id, config and weights, got "
                       f"Content-Type {content_type or 'none'!r}", "invalid_form", reason="invalid_request")
    parser = MultiPartParser(request.headers, request.stream(), max_files=8, max_fields=16)
    try:
        form = await parser.parse()
    except (MultiPartException, ValueError) as e:
        raise APIError(400, f"malformed multipart body: {e}", "invalid_form", reason="invalid_request") from None
    try:
        return UploadForm(
            id=(await _field(form, "id")).decode("utf-8", "replace").strip(),
            config=await _field(form, "config"),
            weights=await _field(form, "weights", reject_pickle=True),
            shared=_flag(await _field(form, "shared", required=False)),
        )
    finally:
        await form.close()


async def _field(form, name: str, *, required: bool = True, reject_pickle: bool = False) -> bytes:
    values = form.getlist(name)
    if not values:
        if required:
            raise APIError(422, f"missing form field '{name}'", "missing_field", param=name, reason="invalid_request")
        return b""
    if len(values) > 1:
        raise APIError(400, f"form field '{name}' is given {len(values)} times", "invalid_form", param=name,
                       reason="invalid_request")
    value = values[0]
    if isinstance(value, UploadFile):
        if reject_pickle and value.filename and value.filename.lower().endswith(PICKLE_SUFFIXES):
            raise APIError(400, f"'{name}' is the pickle file {value.filename!r}, which is never loaded; upload "
                           "adapter_model.safetensors (PEFT save_pretrained(safe_serialization=True))",
                           "pickle_not_allowed", param=name, reason="invalid_request")
        return await value.read()
    return value.encode("utf-8")


def _flag(raw: bytes) -> bool:
    text = raw.decode("utf-8", "replace").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise APIError(422, f"form field 'shared' must be true or false, got {text!r}", "invalid_field",
                   param="shared", reason="invalid_request")
