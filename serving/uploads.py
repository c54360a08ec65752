"""The API's file fields: an upload's bytes, held in memory.

BentoML takes a field annotated with a ``pathlib`` type as a multipart file part, and for ``Path`` writes every
upload to a temporary file of its own. Creating those files cost about 13% of a worker's CPU at concurrency 32
(py-spy, ``benchmarks/serve.py``), and the service read each file straight back. ``Upload`` is a ``PurePosixPath``
only so that BentoML still parses it as a file part (and documents it so in the OpenAPI page); its validator keeps
the part's bytes instead of writing them out.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic_core import PydanticCustomError, core_schema


class Upload(PurePosixPath):
    """An uploaded file: its name (the path) and its bytes (``data``)."""

    data: bytes

    @classmethod
    def received(cls, filename: str | None, data: bytes) -> Upload:
        """The upload of ``data`` sent under ``filename``."""
        upload = cls(PurePosixPath(filename or "upload").name or "upload")
        upload.data = data
        return upload

    @classmethod
    def _validate(cls, value: object) -> Upload:
        from starlette.datastructures import UploadFile

        if isinstance(value, Upload):
            return value
        if isinstance(value, UploadFile):
            return cls.received(value.filename, value.file.read())
        raise PydanticCustomError("upload_type", "send the image as a file upload (a multipart file part), not as "
                                                 "JSON, text or a URL")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda upload: upload.data))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: Any) -> dict[str, str]:
        # What BentoML's own file fields declare: a file in requests (its OpenAPI page renders an upload button).
        return {"type": "file", "format": "binary"} if handler.mode == "validation" else {"type": "string",
                                                                                            "format": "binary"}
