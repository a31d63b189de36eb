"""Training data: the reference record format, the ProsQA-style generator, data sources.

- ``records``: ``Record``, ``load_records`` / ``save_records`` (JSON list or JSONL, with
  errors that name the record and field).
- ``prosqa``: ``generate(n, seed, size)`` and ``ProsQASettings`` (presets full, mini,
  linear); ``verify``: the per-sample checker; ``vocab``: names; ``graphs``: helpers.
- ``source``: ``resolve_source(spec_or_path, epoch, seed)``, a file or a generator spec
  such as ``prosqa:mini?n=6000`` that gives fresh samples every epoch.
- ``compact``: the ``s t |`` rendering of ProsQA records and questions (Zhu et al. 2025).
- ``stats``: summary statistics; ``cli``: ``engine data prosqa`` / ``engine data stats``.

Nothing here imports torch or knows tokenizers.
"""
