"""Text sources -> token blocks.

Sources (`--data SPEC`): `default` (the embedded BoolQ training passages, for tuning),
`default-dev` (BoolQ dev passages, for evaluation only), a `.txt` file or a folder of them
(one document per file, or per blank-line separated paragraph block), or a `.jsonl` file with a
`text` field. Documents are tokenised and packed into fixed-length blocks separated by EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import EETuneError


def load_texts(spec: str) -> list[str]:
    """Read the documents of a data source (see the module docstring)."""
    from . import defaults

    if spec == "default":
        return load_texts(str(defaults.default_data_file("boolq_train_passages.jsonl")))
    if spec == "default-dev":
        return load_texts(str(defaults.default_data_file("boolq_dev_passages.jsonl")))
    path = Path(spec)
    if not path.exists():
        raise EETuneError(f"data not found: {spec}: give a .txt/.jsonl file, a folder of .txt files, "
                          f"'default' or 'default-dev'")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise EETuneError(f"data folder {spec} has no .txt files: add some or point to a file")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise EETuneError(f"{spec} line {n} is not valid JSON: fix or remove it") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise EETuneError(f"{spec} line {n} has no string 'text' field: give one per line")
                texts.append(row["text"])
    else:
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EETuneError(f"data {spec} is empty: give a source with some text")
    return texts


def pack_blocks(tokenizer, texts: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise documents, join them with EOS, cut into (N, seq_len) blocks (remainder dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise EETuneError(f"data has {len(stream)} tokens, fewer than one block of {seq_len}: give more text "
                          f"or a smaller --seq-len")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
