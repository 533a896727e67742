"""Where bytes live: local paths, `s3://` URIs (through s3fs) and other fsspec URLs such as a
hub dataset's `hf://` files, behind one small interface.

S3 endpoint, region and credentials come from the data config or, when unset there, from the
standard AWS environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...).
Credentials are never logged. Timeouts are short so that an unreachable endpoint or denied
credentials fail within seconds with a one-line `DataError`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec

from raydiff.config import DataConfig
from raydiff.errors import RaydiffError
from raydiff.files import write_atomic

S3_PREFIX = "s3://"


class DataError(RaydiffError):
    """A missing or unusable data source or output; the message is one line and names it."""


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def s3_filesystem(cfg: DataConfig):
    import s3fs

    endpoint = cfg.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return s3fs.S3FileSystem(
        key=cfg.s3_access_key_id, secret=cfg.s3_secret_access_key,
        endpoint_url=endpoint, client_kwargs={"region_name": region} if region else {},
        config_kwargs={"connect_timeout": 5, "read_timeout": 30,
                       "retries": {"max_attempts": 2, "mode": "standard"}},
        skip_instance_cache=True)


def _describe_s3_error(uri: str, error: Exception) -> DataError:
    text = f"{type(error).__name__}: {error}"
    if "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text \
            or isinstance(error, PermissionError):
        why = "access denied (check the S3 credentials)"
    elif "Could not connect" in text or "EndpointConnectionError" in text \
            or "ConnectTimeout" in text or "connect" in text.lower():
        why = "cannot reach the S3 endpoint (check data.s3_endpoint / AWS_ENDPOINT_URL)"
    elif isinstance(error, FileNotFoundError) or "NoSuchBucket" in text:
        why = "no such bucket or key"
    else:
        why = type(error).__name__
    return DataError(f"{uri}: {why}")


@dataclass
class Location:
    """A directory-like place (a local path, an s3:// prefix or another fsspec URL) with its
    fsspec filesystem."""

    uri: str
    fs: fsspec.AbstractFileSystem

    @classmethod
    def of(cls, uri: str, cfg: DataConfig) -> Location:
        if is_s3(uri):
            return cls(uri.rstrip("/"), s3_filesystem(cfg))
        if "://" in uri:  # hf:// (a hub dataset's files) and other fsspec URLs
            return cls(uri.rstrip("/"), fsspec.core.url_to_fs(uri)[0])
        return cls.local(uri)

    @classmethod
    def local(cls, path: str | Path) -> Location:
        return cls(str(Path(path).expanduser().resolve()), fsspec.filesystem("file"))

    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    def child(self, name: str) -> Location:
        return Location(f"{self.uri}/{name}", self.fs)

    def exists(self) -> bool:
        try:
            return self.fs.exists(self.uri)
        except Exception as e:  # network and permission errors surface as one line
            raise _describe_s3_error(self.uri, e) from None

    def read_text(self) -> str:
        with self.fs.open(self.uri, "r") as f:
            return f.read()

    def write_text_atomic(self, text: str) -> None:
        self.write_bytes_atomic(text.encode())

    def write_bytes_atomic(self, data: bytes) -> None:
        """Whole or absent. Local: `raydiff.files.write_atomic`. S3: a single PUT already is."""
        if not self.is_local:
            self.fs.pipe(self.uri, data)
            return
        write_atomic(self.uri, data)

    def arrow_filesystem(self):
        """The pyarrow filesystem Ray Data reads and writes through (None: local default)."""
        if self.is_local:
            return None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))

    def ray_path(self, uri: str | None = None) -> str:
        """A path as Ray Data wants it next to `arrow_filesystem()` (no scheme)."""
        uri = uri or self.uri
        return uri.split("://", 1)[1] if "://" in uri else uri


def list_source_files(source: str, cfg: DataConfig) -> tuple[list[str], Location]:
    """The files a local or s3:// path, directory or glob names, sorted, with their location."""
    if not is_s3(source):
        return [str(p) for p in local_files(source)], Location.of(source, cfg)
    location = Location.of(source, cfg)
    fs = location.fs
    try:
        if any(ch in source for ch in "*?["):
            found = fs.glob(source)
        elif fs.isdir(source):
            found = fs.find(source)
        elif fs.exists(source):
            found = [source]
        else:
            raise DataError(f"data.source={source}: no such bucket or key")
    except DataError:
        raise
    except Exception as e:
        raise _describe_s3_error(f"data.source={source}", e) from None
    files = sorted(S3_PREFIX + f.removeprefix(S3_PREFIX) for f in found
                   if not Path(f).name.startswith("."))
    if not files:
        raise DataError(f"data.source={source}: matches no files")
    return files, location


def local_files(source: str) -> list[Path]:
    """The files a local path, directory or glob names, sorted."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data.source={source}: no such file or directory")
    if not files:
        raise DataError(f"data.source={source}: matches no files")
    return files


def file_identity(path: str, info: dict) -> str:
    """What changes when a file's content does: path, size and modification time or ETag
    (`info` is the filesystem's, `file_info`)."""
    stamp = (info.get("ETag") or info.get("blob_id") or info.get("mtime")
             or info.get("LastModified") or "")
    return f"{path}|{info.get('size')}|{stamp}"


def file_info(path: str, location: Location) -> dict:
    try:
        return location.fs.info(path)
    except Exception as e:  # network and permission errors surface as one line
        raise _describe_s3_error(path, e) from None
