"""Data sources -> documents -> token blocks (with a held-out validation slice).

Sources (`--data SPEC`):
- `default`: the embedded BoolQ training passages (for tuning); `default-dev`: BoolQ dev
  passages (for evaluation only; never in `default`).
- a `.txt` file (one document) or a folder of `.txt` files (one document per file);
- a `.jsonl` file whose rows have a `text` field, or are instruction data: `instruction` /
  `response` (optional `input`), `prompt` / `completion`, or `messages` (a list of
  `{"role", "content"}`); instruction rows are rendered with the tokenizer's chat template;
- any other local file the Hugging Face `datasets` library reads (`.json`, `.parquet`,
  `.csv`, `.arrow`), with the same row formats (needs `pip install datasets`);
- `generated:N[:SOURCE]`: N tokens sampled from the backbone itself (eetune.train.selfdata); tuning only.

Mixtures: `SPEC:WEIGHT,SPEC:WEIGHT,...` (e.g. `default:0.3,generated:200000:0.7`) trains on
blocks drawn from each source in proportion to the weights (`parse_data_spec`, `mix_blocks`);
each source keeps its own held-out documents.

`load_texts(spec, tokenizer)` returns the rendered documents. `tokenize_documents` tokenises
them once and caches the result under `$EETUNE_CACHE/tokens` (keyed by the source's content
and the tokenizer). `train_val_blocks` splits whole documents into a training part and a
held-out validation part (no validation token ever appears in training) and packs each into
fixed-length blocks separated by EOS. `pack_blocks` packs documents without a split.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from eetune.errors import EETuneError

DATASETS_SUFFIXES = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
NAMED_SOURCES = ("default", "default-dev")
INSTRUCTION_FORMATS = "a 'text' field, instruction/response, prompt/completion or messages"


# --- data specs and mixtures ---------------------------------------------------------------
@dataclass(frozen=True)
class DataPart:
    """One source of a data spec: `spec` as `load_texts` reads it, or generated data."""
    spec: str
    weight: float = 1.0
    generated: int | None = None  # N of `generated:N[:SOURCE]`
    source: str = "default"  # SOURCE of generated data


def _weight(text: str, part: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise EETuneError(f"data mixture weight {text!r} in {part!r} is not a number: write SPEC:WEIGHT, e.g. "
                          f"default:0.3,generated:200000:0.7") from None
    if not math.isfinite(w) or w < 0:
        raise EETuneError(f"data mixture weight {text!r} in {part!r} must be finite and >= 0")
    return w


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_data_spec(spec: str) -> list[DataPart]:
    """`default` -> [DataPart("default")]; `default:0.3,generated:2000:0.7` -> two weighted parts.
    A trailing `:NUMBER` is a weight; `generated:N[:SOURCE][:WEIGHT]` takes N first."""
    if not isinstance(spec, str) or not spec.strip():
        raise EETuneError("empty --data: give a source such as default, a file, or generated:N")
    parts = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise EETuneError(f"--data {spec!r} has an empty part: separate sources with single commas")
        if part == "generated" or part.startswith("generated:"):
            fields = part.split(":")[1:]
            if not fields or not fields[0].strip().lstrip("-").isdigit():
                raise EETuneError(f"{part!r}: write generated:N[:SOURCE][:WEIGHT] with N a whole number of tokens, "
                                  f"e.g. generated:200000")
            n = int(fields[0])
            if n <= 0:
                raise EETuneError(f"{part!r}: N must be a positive number of tokens, e.g. generated:200000")
            rest, weight = fields[1:], 1.0
            if rest and _is_number(rest[-1]):
                weight = _weight(rest[-1], part)
                rest = rest[:-1]
            source = ":".join(rest) or "default"
            check_generated_source(source)
            parts.append(DataPart("generated", weight, n, source))
            continue
        name, sep, tail = part.rpartition(":")
        if part in NAMED_SOURCES or Path(part).exists() or not sep or not (name in NAMED_SOURCES or Path(name).exists()):
            parts.append(DataPart(part))  # a source as it is (one that does not exist is refused when read)
        else:
            parts.append(DataPart(name, _weight(tail, part)))
    if not sum(p.weight for p in parts) > 0:
        raise EETuneError(f"--data {spec!r}: the mixture weights sum to 0: give at least one positive weight")
    return parts


def uses_generated(spec: str) -> bool:
    """Whether the data spec samples from the model itself (a `generated:N` part)."""
    return any(p.generated is not None for p in parse_data_spec(spec))


def mix_blocks(parts: list[torch.Tensor], weights: list[float], seed: int = 0,
               max_blocks: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Training blocks of several sources in proportion to `weights`: as many blocks in all as
    the sources hold together (at most `max_blocks`), source i giving round(w_i / sum(w) * total)
    of them, its blocks taken in a seeded order and repeated if it has fewer. Returns the blocks
    (shuffled together) and how many each source gave."""
    total = sum(p.shape[0] for p in parts)
    if max_blocks is not None:
        total = min(total, max_blocks)
    W = sum(weights)
    counts = [round(w / W * total) for w in weights]
    out = []
    for i, (blocks, c) in enumerate(zip(parts, counts)):
        if c == 0:
            continue
        g = torch.Generator().manual_seed(seed * 7919 + i)
        reps = math.ceil(c / blocks.shape[0])
        order = torch.cat([torch.randperm(blocks.shape[0], generator=g) for _ in range(reps)])[:c]
        out.append(blocks[order])
    mixed = torch.cat(out)
    mixed = mixed[torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(seed))]
    return mixed, counts


# --- reading rows --------------------------------------------------------------------------
def _resolve(spec: str) -> Path:
    from eetune.model import defaults

    if spec == "default":
        return defaults.default_data_file("boolq_train_passages.jsonl")
    if spec == "default-dev":
        return defaults.default_data_file("boolq_dev_passages.jsonl")
    path = Path(spec)
    if not path.exists():
        raise EETuneError(f"data not found: {spec}: give a .txt/.jsonl/.json/.parquet/.csv file, a folder of "
                          f".txt files, 'default' or 'default-dev'")
    return path


MAX_INVALID_UTF8 = 0.01  # share of a text file's bytes that may be invalid UTF-8 (read as U+FFFD, with a warning)
_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each byte that is not UTF-8


def read_text_file(path: Path) -> str:
    """A plain-text data file as UTF-8 text. Refuses (one line naming the file) a file that is
    binary or in another encoding: NUL bytes (binary data, or UTF-16/32 text), or more than
    `MAX_INVALID_UTF8` of its bytes invalid UTF-8; a few invalid bytes (a stray Latin-1
    character) are read as U+FFFD replacement characters, with a warning naming the first."""
    data = path.read_bytes()
    fix = f"re-save it as UTF-8 text (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt) or remove it"
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise EETuneError(f"data file {path} holds NUL bytes (first on line {line}): it "
                          f"is binary, or UTF-16/32 text, not UTF-8 text; {fix}")
    escaped = data.decode("utf-8", errors="surrogateescape")
    bad = len(_ESCAPED.findall(escaped))
    if not bad:
        return escaped
    first = _ESCAPED.search(escaped).start()
    line = escaped.count("\n", 0, first) + 1
    if bad > MAX_INVALID_UTF8 * len(data):
        raise EETuneError(f"data file {path} is not UTF-8 text: {bad:,} of its {len(data):,} bytes are invalid "
                          f"(first on line {line}); {fix}")
    import sys
    print(f"eetune: warning: {path} has {bad:,} byte{'s' if bad > 1 else ''} that {'are' if bad > 1 else 'is'} not "
          f"UTF-8 (first on line {line}); read as replacement characters (re-save it as UTF-8 to keep them)",
          file=sys.stderr)
    return data.decode("utf-8", errors="replace")


def _read_jsonl(path: Path, spec: str) -> list[dict]:
    """The objects of a JSON Lines file, one per non-blank line; a line that is not UTF-8 (JSON
    text is UTF-8), not JSON or not an object is refused in one line naming it."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark at the start is fine
            except UnicodeDecodeError as e:
                raise EETuneError(f"{spec} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}):"
                                  f" JSON Lines must be UTF-8; re-save the file as UTF-8 (e.g. iconv -f latin1 -t "
                                  f"utf-8 {path.name} > fixed.jsonl)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise EETuneError(f"{spec} line {n} is not valid JSON: fix or remove it") from None
            if not isinstance(row, dict):
                raise EETuneError(f"{spec} line {n} is not a JSON object: give one object per line")
            rows.append(row)
    return rows


def read_rows(spec: str) -> list:
    """The raw rows of a source: strings (plain text) or dicts (JSONL / datasets rows)."""
    path = _resolve(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise EETuneError(f"data folder {spec} has no .txt files: add some or point to a file")
        return [read_text_file(p) for p in files]
    if path.suffix == ".jsonl":
        return _read_jsonl(path, spec)
    if path.suffix in DATASETS_SUFFIXES:
        return _read_with_datasets(path, DATASETS_SUFFIXES[path.suffix])
    return [read_text_file(path)]


def _read_with_datasets(path: Path, builder: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise EETuneError(f"reading {path.suffix} files needs the Hugging Face datasets library: "
                          f"`pip install datasets`, or convert {path.name} to .jsonl") from None
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                   cache_dir=str(_cache_root() / "datasets"))
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EETuneError(f"cannot read {path} with datasets ({builder}): {first}") from None
    return [dict(r) for r in ds]


def render_row(row, tokenizer=None, where: str = "") -> str:
    """One row -> one document: its text, or an instruction exchange through the chat template."""
    if isinstance(row, str):
        return row
    if isinstance(row.get("text"), str):
        return row["text"]
    messages = None
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise EETuneError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
    elif isinstance(row.get("instruction"), str) and isinstance(row.get("response", row.get("output")), str):
        prompt = row["instruction"]
        if isinstance(row.get("input"), str) and row["input"].strip():
            prompt = f"{prompt}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": row.get("response", row.get("output"))}]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if messages is None:
        raise EETuneError(f"{where} has none of {INSTRUCTION_FORMATS} (keys: {sorted(row)[:6]}): "
                          f"give one per row")
    if tokenizer is None:
        raise EETuneError(f"{where} is instruction data: it needs a tokenizer with a chat template to render")
    if not getattr(tokenizer, "chat_template", None):
        raise EETuneError(f"{where} is instruction data but the tokenizer has no chat template: "
                          f"use plain 'text' rows or a model with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def load_texts(spec: str, tokenizer=None) -> list[str]:
    """The documents of a data source (see the module docstring), empty ones dropped."""
    rows = read_rows(spec)
    texts = [render_row(r, tokenizer, f"{spec} row {i + 1}") for i, r in enumerate(rows)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EETuneError(f"data {spec} is empty: give a source with some text")
    return texts


# --- tokenising (cached) -------------------------------------------------------------------
def _cache_root() -> Path:
    from eetune.model import defaults
    return defaults.cache_dir()


def _source_key(spec: str) -> str:
    """Identity of a source's content: path, size and mtime of every file it reads."""
    path = _resolve(spec)
    files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tokenizer_key(tokenizer) -> str:
    """What decides a text's token ids: the whole fast-tokenizer definition (vocabulary, merges,
    normalizer, pre-tokenizer) when there is one, else the vocabulary; EOS and chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def tokenize_documents(spec: str, tokenizer, cache: bool = True) -> list[torch.Tensor]:
    """Token ids of every document of `spec` (no special tokens added), tokenised once and
    cached as safetensors under `$EETUNE_CACHE/tokens/`."""
    from safetensors.torch import load_file, save_file

    path = None
    if cache:
        key = hashlib.sha256(f"{_source_key(spec)}|{tokenizer_key(tokenizer)}|v1".encode()).hexdigest()[:32]
        path = _cache_root() / "tokens" / f"{key}.safetensors"
        if path.is_file():
            try:
                t = load_file(str(path))
                return list(torch.split(t["ids"].long(), t["lengths"].tolist()))
            except Exception as e:  # noqa: BLE001 - a cache heals itself: tokenise again
                import sys
                print(f"eetune: warning: token cache {path} is unreadable ({type(e).__name__}); tokenising again",
                      file=sys.stderr)
    texts = load_texts(spec, tokenizer)
    docs = [torch.tensor(ids, dtype=torch.long)
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    docs = [d for d in docs if d.numel()]
    if not docs:
        raise EETuneError(f"data {spec} tokenises to nothing: give a source with some text")
    if path is not None:
        from eetune.fsio import atomic_write
        tensors = {"ids": torch.cat(docs).to(torch.int32),
                   "lengths": torch.tensor([d.numel() for d in docs], dtype=torch.long)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"source": str(spec)}))
    return docs


# --- packing -------------------------------------------------------------------------------
def _pack_ids(docs: list[torch.Tensor], eos: int | None, seq_len: int, max_blocks: int | None) -> torch.Tensor:
    parts, total = [], 0
    need = None if max_blocks is None else max_blocks * seq_len
    sep = torch.tensor([eos], dtype=torch.long) if eos is not None else None
    for d in docs:
        parts.append(d)
        total += d.numel()
        if sep is not None:
            parts.append(sep)
            total += 1
        if need is not None and total >= need:
            break
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    n = stream.numel() // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return stream[: n * seq_len].view(n, seq_len)


def pack_blocks(tokenizer, texts: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise documents, join them with EOS, cut into (N, seq_len) blocks (remainder dropped)."""
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
    blocks = _pack_ids(docs, tokenizer.eos_token_id, seq_len, max_blocks)
    if blocks.shape[0] == 0:
        n = sum(d.numel() + (tokenizer.eos_token_id is not None) for d in docs)
        raise EETuneError(f"data has {n} tokens, fewer than one block of {seq_len}: give more text "
                          f"or a smaller --seq-len")
    return blocks


def part_documents(part: DataPart, tokenizer, cache: bool = True, generated=None,
                   progress: bool = True) -> list[torch.Tensor]:
    """Token ids of every document of one source of a data spec. `generated(part, tokenizer,
    progress)` serves `generated:N` sources (`eetune.train.selfdata.generated_source`)."""
    if part.generated is not None:
        if generated is None:
            raise EETuneError("generated:N data is sampled from the model being tuned: use it with `eetune tune`")
        return generated(part, tokenizer, progress)
    return tokenize_documents(part.spec, tokenizer, cache=cache)


def check_generated_source(source: str) -> None:
    """Refuse a SOURCE of generated:N[:SOURCE] that is neither `default` nor a readable data
    source, or is evaluation text."""
    if source == "default":
        return
    if source == "default-dev":
        raise EETuneError("generated:N:default-dev would prompt with the evaluation split: use default or a file "
                          "of your own, and keep evaluation text apart")
    if not Path(source).exists():
        raise EETuneError(f"unknown source {source!r} for generated data: give default or a .txt/.jsonl file or "
                          f"folder of prompts")


def _label(part: DataPart) -> str:
    return f"generated:{part.generated}:{part.source}" if part.generated is not None else part.spec


def train_val_blocks(spec: str, tokenizer, seq_len: int, val_blocks: int = 8, max_blocks: int | None = None,
                     seed: int = 0, cache: bool = True, generated=None,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training and validation blocks of `spec`, split by whole documents.

    Documents are de-duplicated (exact copies, across the sources of a mixture too) and
    shuffled with a fixed seed; the first ones, until they fill `val_blocks` blocks, are held
    out for validation, the rest packed for training (at most `max_blocks`). If the source is
    small, the validation slice shrinks to a tenth of it (at least one block); `val_blocks=0`
    holds nothing out. A mixture splits each source on its own (its share of `val_blocks` by
    weight, at least one block each) and mixes the training blocks by weight (`mix_blocks`).
    `generated` serves `generated:N` sources (see `part_documents`).
    Returns (train, val, info)."""
    if seq_len < 2:
        raise EETuneError(f"--seq-len {seq_len} is too short: give at least 2 tokens per block")
    parts = [p for p in parse_data_spec(spec) if p.weight > 0]
    seen: set = set()
    if len(parts) == 1:
        docs = part_documents(parts[0], tokenizer, cache, generated, progress)
        return _split(_label(parts[0]), docs, tokenizer, seq_len, val_blocks, max_blocks, seed, seen)
    W = sum(p.weight for p in parts)
    trains, vals, infos = [], [], []
    for p in parts:
        docs = part_documents(p, tokenizer, cache, generated, progress)
        want = val_blocks if val_blocks <= 0 else max(1, round(val_blocks * p.weight / W))
        tr, va, info = _split(_label(p), docs, tokenizer, seq_len, want, max_blocks, seed, seen)
        trains.append(tr)
        vals.append(va)
        infos.append({**info, "weight": p.weight})
    train, counts = mix_blocks(trains, [p.weight for p in parts], seed, max_blocks)
    for info, c in zip(infos, counts):
        info["train_blocks_mixed"] = c
    val = torch.cat(vals)
    info = {"source": spec, "parts": infos, "seq_len": seq_len,
            "documents": sum(i["documents"] for i in infos),
            "duplicates_removed": sum(i["duplicates_removed"] for i in infos),
            "tokens": sum(i["tokens"] for i in infos), "train_blocks": int(train.shape[0]),
            "val_blocks": int(val.shape[0]), "val_documents": sum(i["val_documents"] for i in infos)}
    return train, val, info


def _split(spec: str, docs: list[torch.Tensor], tokenizer, seq_len: int, val_blocks: int, max_blocks: int | None,
           seed: int, seen: set) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One source's documents -> (train, val, info); `seen` holds the hashes of documents taken
    from earlier sources of a mixture (updated)."""
    # Exact duplicates would leak across the split (a copy held out, another trained on): keep the first.
    unique = []
    for d in docs:
        key = hashlib.sha1(d.to(torch.int64).numpy().tobytes()).digest()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    duplicates = len(docs) - len(unique)
    docs = unique
    eos = tokenizer.eos_token_id
    total = sum(d.numel() + (eos is not None) for d in docs)
    total_blocks = total // seq_len
    if total_blocks < 1:
        raise EETuneError(f"data {spec} has {total} tokens, fewer than one block of {seq_len}: give more text "
                          f"or a smaller --seq-len")
    want_val = 0 if val_blocks <= 0 else min(val_blocks, max(1, total_blocks // 10))
    if want_val and total_blocks < 2:
        raise EETuneError(f"data {spec} has {total} tokens: one block of {seq_len} to train on plus one held out "
                          f"for validation need at least {2 * seq_len}; give more text, a smaller --seq-len or "
                          f"--val-blocks 0")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    val_docs, used = [], 0
    while want_val and used < want_val * seq_len and len(val_docs) < len(docs) - 1:
        d = docs[order[len(val_docs)]]
        val_docs.append(d)
        used += d.numel() + (eos is not None)
    train_docs = [docs[i] for i in order[len(val_docs):]]
    val = _pack_ids(val_docs, eos, seq_len, want_val) if want_val else torch.zeros(0, seq_len, dtype=torch.long)
    train = _pack_ids(train_docs, eos, seq_len, max_blocks)
    if train.shape[0] == 0 or (want_val and val.shape[0] == 0):
        raise EETuneError(f"data {spec} ({total} tokens, {len(docs)} documents) does not fill one training block "
                          f"and one validation block of {seq_len} tokens from separate documents: give more "
                          f"text, a smaller --seq-len or --val-blocks 0")
    info = {"source": spec, "documents": len(docs), "duplicates_removed": duplicates, "tokens": total,
            "train_blocks": int(train.shape[0]),
            "val_blocks": int(val.shape[0]), "val_documents": len(val_docs), "seq_len": seq_len}
    return train, val, info
