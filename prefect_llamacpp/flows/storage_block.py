"""A batch's storage credentials from a saved Prefect block, for teams that keep them there.

    llamacpp_batch_flow("jobs/in.jsonl", "results/out.jsonl", storage="s3-bucket/results")

Blocks: Prefect's `remote-file-system` (a base URL and fsspec settings) and prefect-aws's
`s3-bucket` (a bucket, a folder and AWS or MinIO credentials). A path is read under the block's
base; the block's credentials open every URL of its protocol for the run. The secrets go to the
storage library and nowhere else.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect.filesystems import RemoteFileSystem
from pydantic import SecretStr

from prefect_llamacpp.exceptions import BlockNotFoundError, ConfigurationError

_KINDS = "remote-file-system/NAME, or s3-bucket/NAME with prefect-aws installed"


async def storage_from_block(name: str) -> tuple[str, dict[str, Any]]:
    """(base URL, fsspec options) of the storage block `name` (`TYPE/NAME`). Raises
    `BlockNotFoundError` for a missing block, `ConfigurationError` for one that is no storage."""
    if name.count("/") != 1 or not all(name.split("/")):
        raise ConfigurationError(f"storage {name!r}: give the block as {_KINDS}")
    kind = name.split("/")[0]
    try:
        block = await Block.aload(name)
    except ValueError as exc:
        raise BlockNotFoundError(
            f"No storage block {name!r}: save one (Prefect UI -> Blocks, or "
            f"RemoteFileSystem(basepath='s3://bucket/prefix', settings={{...}}).save(...)), "
            f"as {_KINDS}"
        ) from exc
    except KeyError as exc:  # a block type whose class is not installed
        raise ConfigurationError(
            f"storage {name!r}: its block type {kind!r} is not installed here (for s3-bucket: "
            "pip install prefect-aws)"
        ) from exc
    if isinstance(block, RemoteFileSystem):
        return block.basepath, dict(block.settings)
    if type(block).__name__ == "S3Bucket":
        folder = block.bucket_folder.strip("/")
        return f"s3://{block.bucket_name}" + (f"/{folder}" if folder else ""), _s3_options(
            block.credentials, name
        )
    raise ConfigurationError(
        f"storage {name!r} is a {type(block).__name__} block, not storage a batch can use: "
        f"give {_KINDS}"
    )


def _s3_options(credentials, name: str) -> dict[str, Any]:
    """s3fs's options for prefect-aws's AwsCredentials or MinIOCredentials."""
    if getattr(credentials, "assume_role_arn", None):
        raise ConfigurationError(
            f"storage {name!r}: its AWS credentials assume a role, which the batch's storage "
            "library does not; give keys or a profile, or use the worker's own role"
        )
    key = getattr(credentials, "aws_access_key_id", None) or getattr(
        credentials, "minio_root_user", None
    )
    secret = getattr(credentials, "aws_secret_access_key", None) or getattr(
        credentials, "minio_root_password", None
    )
    client = credentials.aws_client_parameters
    client_kwargs = {
        "region_name": credentials.region_name,
        "endpoint_url": client.endpoint_url,
        "verify": client.verify_cert_path or client.verify,
        "use_ssl": client.use_ssl,
    }
    options: dict[str, Any] = {
        "key": key,
        "secret": secret.get_secret_value() if isinstance(secret, SecretStr) else secret,
        "token": getattr(credentials, "aws_session_token", None),
        "profile": getattr(credentials, "profile_name", None),
        "client_kwargs": {k: v for k, v in client_kwargs.items() if v is not None},
    }
    return {k: v for k, v in options.items() if v is not None}
