"""What `data.source` names, resolved to a list of input files (or the synthetic corpus), and
where its prepared output goes.

    local path, directory or glob   files, sorted
    s3://bucket/prefix (or a glob)  objects, through s3fs
    a hub id (cc_news, org/name,    the dataset's own data files (Parquet, JSON Lines, text),
      or a builder such as parquet   resolved by `datasets` (metadata only) and streamed like
      with data.hub_data_files)      any other files: nothing is loaded into this process
    synthetic                       the generated toy corpus

The output is `data.out_dir/<name>-<fingerprint>`; the fingerprint hashes the data config
(less out_dir and credentials) and every input file's identity (size and mtime, ETag or blob
id), so a different source or config writes elsewhere and re-running the same one finds its
manifest and does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from raydiff.config import SECRET_KEYS, DataConfig
from raydiff.data.records import MAX_FILES, InputFile
from raydiff.data.storage import (
    DataError,
    Location,
    file_identity,
    file_info,
    is_s3,
    list_source_files,
    local_files,
)

FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".txt", ".parquet", ".bz2", ".xz", ".zst")
READABLE = (".parquet", ".jsonl", ".json", ".txt")  # after a compression suffix is taken off
SECRET_FIELDS = {key.split(".", 1)[1] for key in SECRET_KEYS}


@dataclass
class Source:
    """`data.source` resolved: "files" (local, s3 or a hub dataset's) or "synthetic"."""

    kind: str
    name: str  # a short label for the output directory
    files: list[InputFile] = field(default_factory=list)
    location: Location | None = None  # where the files live
    identity: list[str] = field(default_factory=list)  # what the fingerprint hashes

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def looks_like_files(source: str) -> bool:
    """s3 URIs, existing paths, globs, and anything path-like (absolute, ./ ~/, a data file
    suffix) are files; what is left is a hub id such as `cc_news` or `org/name`."""
    return (is_s3(source) or Path(source).expanduser().exists()
            or any(ch in source for ch in "*?[") or source.startswith(("/", ".", "~"))
            or source.endswith(FILE_SUFFIXES))


def resolve_source(cfg: DataConfig) -> Source:
    src = cfg.source
    if src == "synthetic":
        return Source("synthetic", "synthetic")
    if looks_like_files(src):
        paths, location = list_source_files(src, cfg)
        name = Path(src.rstrip("/*")).name.split(".")[0] or "corpus"
        infos = [file_info(p, location) for p in _checked(paths, src)]
        files = [InputFile(i, p, Path(p).name, size=info.get("size") or 0)
                 for i, (p, info) in enumerate(zip(paths, infos, strict=True))]
        return Source("files", name, files, location,
                      [file_identity(p, info) for p, info in zip(paths, infos, strict=True)])
    return _hub_source(cfg)


def _checked(paths: list[str], source: str) -> list[str]:
    if len(paths) > MAX_FILES:
        raise DataError(f"data.source={source}: {len(paths):,} files; raydiff reads at most "
                        f"{MAX_FILES:,} (concatenate some)")
    return paths


def _hub_source(cfg: DataConfig) -> Source:
    """A hub dataset's data files for `data.hub_split`, as `datasets` resolves them."""
    import datasets

    if cfg.hub_data_files:
        local_files(cfg.hub_data_files)  # a local pattern that matches nothing fails here
    try:
        builder = datasets.load_dataset_builder(cfg.source, name=cfg.hub_config,
                                                data_files=cfg.hub_data_files)
    except Exception as e:
        raise DataError(f"data.source={cfg.source}: cannot resolve hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    data_files = builder.config.data_files or {}
    if cfg.hub_split not in data_files:
        raise DataError(f"data.source={cfg.source}: no split {cfg.hub_split!r} among its data "
                        f"files (splits: {', '.join(data_files) or 'none'})")
    paths = [str(p) for p in data_files[cfg.hub_split]]
    unreadable = [p for p in paths if not _readable(p)]
    if unreadable:
        raise DataError(f"data.source={cfg.source}: data file {unreadable[0]} is not Parquet, "
                        "JSON Lines or text")
    location = Location.of(paths[0], cfg) if paths else None
    name = cfg.source.replace("/", "_")
    files, identity, offset = [], [f"hub:{cfg.source}|{cfg.hub_config}|{cfg.hub_split}"], 0
    for i, path in enumerate(_checked(paths, cfg.source)):
        info = file_info(path, location)
        size = info.get("size") or 0
        if path.endswith(".parquet"):  # rows are numbered across the files, as `datasets` does
            files.append(InputFile(i, path, name, offset, size))
            offset += _parquet_rows(location, path)
        else:
            files.append(InputFile(i, path, Path(path).name, size=size))
        identity.append(file_identity(path, info))
    return Source("files", name, files, location, identity)


def _readable(path: str) -> bool:
    name = path.lower()
    for compression in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(compression)
    return name.endswith(READABLE)


def _parquet_rows(location: Location, path: str) -> int:
    import pyarrow.parquet as pq

    with location.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def fingerprint(cfg: DataConfig, source: Source) -> str:
    """Hash of the data config (less what does not change the output: out_dir, strict and
    credentials) and the source's identity."""
    h = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out_dir", "strict") and k not in SECRET_FIELDS}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for item in source.identity:
        h.update(item.encode())
    return h.hexdigest()


def output_location(cfg: DataConfig, source: Source | None = None) -> Location:
    source = source or resolve_source(cfg)
    base = Location.of(cfg.out_dir, cfg)
    return base.child(f"{source.name}-{fingerprint(cfg, source)[:12]}")
