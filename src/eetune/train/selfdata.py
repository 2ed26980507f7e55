"""Self-generated tuning data: continuations sampled from the backbone itself.

    eetune tune runs/exits --out runs/tuned --data generated:200000
    eetune tune runs/exits --out runs/tuned --data default:0.3,generated:200000:0.7

An exit is worth as much as the share of the *full model's own* tokens it predicts with
confidence. Draft-head methods (Medusa-2's self-distillation, EAGLE) therefore train on text the
model generates rather than on human text. `generated:N[:SOURCE]` does that for exits: it samples
N new tokens of continuations from the backbone and tunes on prompt + continuation.

Prompts (SOURCE):
- `default`: questions and passages of the embedded BoolQ *training* split (never the dev split
  that evaluation uses). Each prompt is one of four requests, in turn: answer the question about
  the passage, summarise the passage, answer the question alone (all three as a user turn of
  the chat template when the tokenizer has one), and continue the passage's first
  `OPENING_TOKENS` tokens as plain text.
- a data source `eetune.train.data` reads (a .txt/.jsonl/... file or a folder): the first
  `OPENING_TOKENS` tokens of each document, continued as plain text.

Generation is batched through the decoding engine (`eetune.decode.api.generate`, mode `full`),
sampled with `GenSettings.temperature` / `top_p`, chunk c of `batch_size` prompts with seed
`seed * 1_000_003 + c`, until N new tokens exist. Prompts are shuffled with the seed and reused
(with new seeds) if N needs more than one pass over them.

Cache: `$EETUNE_CACHE/generated/<key>.safetensors`, the key covering the backbone fingerprint
and dtype, the tokenizer, the prompts' token ids, N and every setting. Each finished chunk is
written atomically to `<key>.parts/`, so an interrupted run resumes after its last complete
chunk with the same result; the cache entry appears (atomically) only when all N tokens exist.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eetune.errors import EETuneError
from eetune.progress import progress_display
from eetune.train.data import check_generated_source, load_texts, tokenizer_key

OPENING_TOKENS = 48  # tokens of a document's opening used as a plain-text prompt
MAX_PROMPT_TOKENS = 768  # longer prompts are skipped (they would cost prefill, not add tokens)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GenSettings:
    temperature: float = 0.8  # sampling temperature (> 0)
    top_p: float = 0.95  # nucleus mass
    max_new_tokens: int = 256  # continuation length cap per prompt
    batch_size: int = 16  # prompts decoded together
    seed: int = 0

    def check(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise EETuneError(f"--gen-temperature {self.temperature}: give a number > 0 (e.g. 0.8)")
        if not 0 < self.top_p <= 1:
            raise EETuneError(f"--gen-top-p {self.top_p} is outside (0, 1]: give e.g. 0.95")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise EETuneError("--gen-max-new-tokens and --gen-batch-size must be at least 1")


# --- prompts --------------------------------------------------------------------------------
def _as_user_turn(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        from eetune.decode.api import chat_prompt_ids
        return chat_prompt_ids(tokenizer, text)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _opening(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids[:OPENING_TOKENS])


def boolq_prompts(tokenizer, rows) -> list[list[int]]:
    """Prompt token ids of BoolQ rows ({"question", "passage"}): row i is request i % 4 of the
    module docstring's four (question about the passage, summary, question alone, the passage's
    opening as plain text)."""
    prompts = []
    for i, r in enumerate(rows):
        q = r["question"].strip().rstrip("?")
        q = q[:1].upper() + q[1:] + "?"
        p = r["passage"]
        kind = i % 4
        if kind == 0:
            prompts.append(_as_user_turn(tokenizer, f"{p}\n\n{q} Answer yes or no, then explain briefly."))
        elif kind == 1:
            prompts.append(_as_user_turn(tokenizer, f"Summarise this passage in a few sentences.\n\n{p}"))
        elif kind == 2:
            prompts.append(_as_user_turn(tokenizer, q))
        else:
            prompts.append(_opening(tokenizer, p))
    return prompts


def build_prompts(tokenizer, source: str, seed: int) -> list[list[int]]:
    """Prompt token ids of SOURCE (see the module docstring), shuffled with `seed`."""
    check_generated_source(source)
    if source == "default":
        from eetune.model import defaults
        path = defaults.default_data_file("boolq_train_prompts.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = boolq_prompts(tokenizer, rows)
    else:
        prompts = [_opening(tokenizer, t) for t in load_texts(source, tokenizer)]
    prompts = [p for p in prompts if 0 < len(p) <= MAX_PROMPT_TOKENS]
    if not prompts:
        raise EETuneError(f"generated data: source {source!r} gives no usable prompt: give one with some text")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[i] for i in order]


# --- generation with a resumable cache ------------------------------------------------------
def cache_path(key: str) -> Path:
    from eetune.model import defaults
    return defaults.cache_dir() / "generated" / f"{key}.safetensors"


def cache_key(model, tokenizer, prompts: list[list[int]], n: int, settings: GenSettings) -> str:
    from eetune.model.backbone import fingerprint

    h = hashlib.sha256()
    dtype = next(model.backbone.model.parameters()).dtype
    # the exits directory's recorded fingerprint (checked on load) saves hashing every weight again
    fp = getattr(model.config, "backbone_fingerprint", "") or fingerprint(model.backbone.model)
    h.update(json.dumps({"backbone": fp, "dtype": str(dtype), "n": n,
                         "settings": asdict(settings), "version": FORMAT_VERSION}, sort_keys=True).encode())
    h.update(tokenizer_key(tokenizer).encode())
    for p in prompts:
        h.update(torch.tensor(p, dtype=torch.int32).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def _save_docs(path: Path, docs: list[torch.Tensor], new: list[int]) -> None:
    from safetensors.torch import save_file

    from eetune.fsio import atomic_write

    tensors = {"ids": torch.cat(docs).to(torch.int32) if docs else torch.zeros(0, dtype=torch.int32),
               "lengths": torch.tensor([d.numel() for d in docs], dtype=torch.long),
               "new": torch.tensor(new, dtype=torch.long)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": str(FORMAT_VERSION)}))


def _load_docs(path: Path) -> tuple[list[torch.Tensor], list[int]]:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        docs = list(torch.split(t["ids"].long(), t["lengths"].tolist()))
        return docs, t["new"].tolist()
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        raise EETuneError(f"generated-data cache file {path} is unreadable ({type(e).__name__}): delete it and "
                          f"run again") from None


def generated_documents(model, tokenizer, n: int, source: str = "default", settings: GenSettings = GenSettings(),
                        progress: bool = True, cache: bool = True) -> list[torch.Tensor]:
    """Documents (prompt + sampled continuation, token ids) holding at least `n` generated
    tokens, from the cache when there (see the module docstring). `progress`: a bar on a
    terminal, status lines elsewhere (`eetune.progress`); False: nothing."""
    from eetune.decode.api import DecodeOptions, end_token_ids, generate

    if n < 1:
        raise EETuneError(f"generated:{n}: give a positive number of tokens, e.g. generated:200000")
    settings.check()
    prompts = build_prompts(tokenizer, source, settings.seed)
    key = cache_key(model, tokenizer, prompts, n, settings)
    final = cache_path(key)
    if cache and final.is_file():
        return _load_docs(final)[0]
    parts = final.with_suffix(".parts")
    docs, news, done, chunk = [], [], 0, 0
    if cache:
        parts.mkdir(parents=True, exist_ok=True)
        for p in sorted(parts.glob("part-*.safetensors")):
            if p.name != f"part-{chunk:06d}.safetensors":
                break  # chunks are written in order: anything after a gap is not used
            d, new = _load_docs(p)
            docs += d
            news += new
            done += sum(new)
            chunk += 1
    eos = end_token_ids(model, tokenizer)
    bar = progress_display(n, "generate", "tok", bar=progress, lines=progress, initial=min(done, n))
    was_training = model.training
    model.eval()
    try:
        while done < n:
            batch = [prompts[(chunk * settings.batch_size + i) % len(prompts)] for i in range(settings.batch_size)]
            opts = DecodeOptions(mode="full", max_new_tokens=settings.max_new_tokens,
                                 temperature=settings.temperature, top_p=settings.top_p,
                                 seed=settings.seed * 1_000_003 + chunk, eos_token_ids=eos)
            with torch.no_grad():
                result = generate(model, batch, opts)
            new_docs = [torch.tensor(list(p) + list(r.ids), dtype=torch.long) for p, r in zip(batch, result.rows)]
            new = [len(r.ids) for r in result.rows]
            if cache:
                _save_docs(parts / f"part-{chunk:06d}.safetensors", new_docs, new)
            docs += new_docs
            news += new
            done += sum(new)
            chunk += 1
            bar.update(min(done, n) - bar.n)
    finally:
        bar.close()
        model.train(was_training)
    if cache:
        _save_docs(final, docs, news)
        shutil.rmtree(parts, ignore_errors=True)
    return docs


def generated_source(model, settings: GenSettings | None = None, cache: bool = True):
    """What `eetune.train.data.train_val_blocks(..., generated=...)` takes: a function serving a
    `generated:N[:SOURCE]` part with `generated_documents` from `model`."""
    def serve(part, tokenizer, progress: bool = True):
        return generated_documents(model, tokenizer, part.generated, part.source, settings or GenSettings(),
                                   progress=progress, cache=cache)
    return serve
