"""Corpora -> prepared, tokenized blocks, and back.

Entry points: `pipeline.prepare` (Ray Data, every stage on the workers), `local.prepare_local`
(the same stages in one process), `local.read_segments` (cleaned segments of any source),
`prepared.open_prepared` / `read_split_blocks` / `training_datasets` (reading the output).
The stages themselves are in `stages.py`; `records.py` reads files, `clean.py` and `words.py`
are the text kernels, `sources.py` resolves `data.source`, `output.py` writes the layout.
"""
