"""Before any compute: is everything that ``config.data`` reads on this machine?

:func:`missing_resources` returns one line per missing thing (a tokenizer that is neither
embedded, local, cached nor downloadable; a TFDS dataset that is not prepared; local files
that are absent; a ``text_files`` glob that matches nothing), each saying what is missing and
how to get it once with network access. Nothing is downloaded here. When nothing is missing,
given text files are checked to be text that holds a document (a one-line UserError if not).
"""

from __future__ import annotations

from qtx.data import tfds_sources
from qtx.data.config import DataSpec, require_local_path
from qtx.data.text_sources import TFDS_TEXT, check_text_files, text_file_paths
from qtx.data.tokenizers import tokenizer_missing
from qtx.errors import UserError

LOCAL_FILES = {  # source: a file it needs under config.data.local_dir
    "wikitext2_local": "wikitext-2/valid.txt",
    "sst2_local": "glue/SST-2/train.tsv",
}


def tfds_name_of(source: str) -> str | None:
    """The TFDS dataset behind a ``config.data.name`` source, or None for local sources."""
    from qtx.data.vision import INFO

    if source in TFDS_TEXT:
        return TFDS_TEXT[source][0]
    if source.startswith("glue/"):
        return source
    info = INFO.get(source)
    return info.tfds[0] if info is not None and info.tfds else None


def missing_resources(spec: DataSpec) -> list[str]:
    """One sentence per resource of ``spec`` that this machine lacks (empty: all there).
    Raises a UserError for given text files that are not text or hold no document."""
    lines = []
    if spec.tokenizer:
        why = tokenizer_missing(spec.tokenizer)
        if why:
            lines.append(why)
    for source in spec.sources:
        tfds_name = tfds_name_of(source)
        if tfds_name is not None:
            why = tfds_sources.missing(tfds_name, data_dir=spec.data_dir, name=spec.name)
            if why:
                lines.append(why)
        elif source in LOCAL_FILES:
            try:
                require_local_path(spec.local_dir, spec.name, LOCAL_FILES[source])
            except UserError as e:
                lines.append(str(e))
        elif source == "text_files":
            try:
                text_file_paths(spec)
            except UserError as e:
                lines.append(str(e))
    if not lines and "text_files" in spec.sources:
        check_text_files(spec)
    return lines
