"""An lm-evaluation-harness model type, `eetune`: score and generate with an exits directory.

What it is for: running lm-eval's benchmarks (multiple choice, perplexity, generation) on an
early-exit model, at full depth or through an exit, with our decoding engine for generation:

    eetune lm-eval --model eetune --model_args exits=runs/exits,mode=early-exit,threshold=0.8 \\
        --tasks hellaswag,gsm8k --device cpu
    python -m eetune.measure.lmeval ...        # the same (`--model eetune` is the default of both)

The pinned lm-eval (0.4.13, the `eval` extra) finds models only in its own registry; it loads
no entry-point group for outside packages, so plain `lm_eval --model eetune` cannot find this
class. Both commands above import this module (which registers `eetune` with
`lm_eval.api.registry.register_model`) and then hand their arguments to lm-eval's own command
line (`lm_eval.__main__.cli_evaluate`). From Python: `import eetune.measure.lmeval` before
`lm_eval.simple_evaluate(model="eetune", model_args={...})`, or pass an `EETuneLM` instance.

Requests (lm-eval's conventions, as its `HFLM` follows them, so the figures are comparable):

- `loglikelihood` / `loglikelihood_rolling`: teacher-forced log-probabilities of the
  continuation tokens from the final layer (`logits_from=final`, the default) or from one exit
  (`logits_from=K`). An exit restricted to K tokens + OTHER (`convert --exit-vocab K`) scores
  with a distribution over the whole vocabulary (`exit_log_probs`): its own probability for
  its K tokens, and OTHER's mass spread over the rest as the final layer ranks them (a token
  outside K goes deeper, where the final layer decides), so such an exit runs the whole trunk.
  Context and continuation are tokenised together and split where the
  context's own tokens end (trailing context spaces move to the continuation); an empty
  context is replaced by the BOS token (EOS without one); over-long inputs are cut from the
  left; rolling windows as `lm_eval.utils.get_rolling_token_windows`. `is_greedy`: every
  continuation token is the argmax of the same logits. Batched, longest first, requests that
  share context + continuation[:-1] scored by one forward pass.
- `generate_until`: our decoding engine (`mode=full|early-exit|self-spec`, `threshold`,
  `confidence`, `draft_len`, `draft_exit`) with the request's `max_gen_toks` and `until` stop
  strings (a row stops as soon as one appears; the text is cut before it), greedy unless the
  request asks to sample (`do_sample`, `temperature`, `top_k`, `top_p`).

model_args: exits (required: an exits directory; its base model is loaded from what it names),
mode, threshold, confidence, draft_len, draft_exit, dtype, device, batch_size, max_length,
logits_from. A bad one raises one `EETuneError` naming it and the fix, before any weights load
(settings that depend on the weights, e.g. confidence=gate without gates, just after).
The decoding statistics (mean layers per generated token, layer passes, acceptance) land in the
results' `config.eetune` entry.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry imports them only while empty
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text, resolve_max_length)
except ImportError as e:  # pragma: no cover - depends on the environment
    from eetune.errors import EETuneError
    raise EETuneError(f"lm-evaluation-harness is not installed ({e}): pip install 'eetune[eval]'") from None

from eetune.errors import EETuneError

log = logging.getLogger(__name__)

MODEL_NAME = "eetune"
DEFAULT_BATCH_SIZE = 8  # when neither model_args nor the command line give one (or give `auto`)
DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's HFLM, when a generate_until request names none

# model_args: name -> what it means (the error for an unknown one lists these).
MODEL_ARGS = {
    "exits": "exits directory (required)",
    "mode": "generate_until decoding: full | early-exit | self-spec (default full)",
    "threshold": "early-exit / self-spec confidence threshold (default: early-exit takes the one `eetune calibrate` "
                 "stored in the exits directory, else 0.9)",
    "confidence": "max-prob | gate (default max-prob)",
    "draft_len": "self-spec: most tokens drafted per round (default 4)",
    "draft_exit": "self-spec: the drafting exit layer, or auto (default: the deepest exit)",
    "dtype": "fp32 | bf16 | fp16 (default fp32)",
    "device": "cpu | cuda | cuda:N (default: cuda if there is one, else cpu)",
    "batch_size": f"sequences per forward pass (default {DEFAULT_BATCH_SIZE})",
    "max_length": "context length in tokens (default: the model's)",
    "logits_from": "loglikelihood logits: final, or an exit layer (default final)",
}
# Passed by lm-eval's command line itself; accepted and handled (or ignored) here.
HARNESS_ARGS = ("max_batch_size", "trust_remote_code")


def _bad(msg: str) -> EETuneError:
    return EETuneError(f"lm-eval model_args: {msg}")


def _as_int(name, v, lo=None) -> int:
    if isinstance(v, bool):
        raise _bad(f"{name}={v!r} is not an integer")
    try:
        f = float(v)
        i = int(f)
    except (TypeError, ValueError):
        raise _bad(f"{name}={v!r} is not an integer") from None
    if i != f or (lo is not None and i < lo):
        raise _bad(f"{name}={v!r} must be an integer >= {lo}")
    return i


def _as_float(name, v) -> float:
    if isinstance(v, bool):
        raise _bad(f"{name}={v!r} is not a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise _bad(f"{name}={v!r} is not a number") from None
    if math.isnan(f) or f < 0:
        raise _bad(f"{name}={v!r} must be a number >= 0")
    return f


def exit_log_probs(head, exit_logits: torch.Tensor, final_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities over the whole vocabulary (..., V), fp32, of an exit's logits (..., C).
    An unrestricted head: its log-softmax. A restricted head (K tokens + OTHER, `convert
    --exit-vocab K`) as early exit uses it: a token of its K gets the head's own probability;
    OTHER's mass goes deeper, where the final layer decides among the rest, so a token t outside
    the K gets p_exit(OTHER) * p_final(t) / sum_{u not in K} p_final(u) (`final_logits`
    (..., V): the final layer's logits at the same positions). This sums to 1 over V. With K = V
    (no OTHER) the head is a permutation of a full one and `final_logits` is not needed."""
    lp = F.log_softmax(exit_logits.float(), -1)
    if not getattr(head, "restricted", False):
        return lp
    ids = head.vocab_ids.to(lp.device)
    K, V = ids.numel(), head.adapter.vocab_size
    if not head.has_other:
        return lp.new_empty(*lp.shape[:-1], V).index_copy_(-1, ids, lp)
    if final_logits is None:
        raise EETuneError(f"exit {head.layer} is restricted to {K} tokens + OTHER: scoring through it needs the final "
                          f"layer's logits (OTHER's mass goes to the tokens outside, as the final layer ranks them)")
    rest = F.log_softmax(final_logits.float().index_fill(-1, ids, float("-inf")), -1)  # over the tokens outside K
    return (rest + lp[..., K:K + 1]).index_copy_(-1, ids, lp[..., :K])


class EETuneLM(TemplateLM):
    """lm-eval's `LM` over an `EarlyExitModel` (see the module docstring for the model_args)."""

    backend = "causal"

    def __init__(self, exits=None, mode="full", threshold=None, confidence="max-prob", draft_len=4, draft_exit=None,
                 dtype="fp32", device=None, batch_size=None, max_length=None, logits_from="final",
                 max_batch_size=None, trust_remote_code=None, _soft_device=False):
        super().__init__()
        from eetune.model.backbone import _resolve_dtype
        from eetune.model.config import ExitConfig
        from eetune.decode.api import MODES, DecodeOptions
        from eetune.decode.rules import CONFIDENCES

        # --- check every setting before the (slow) model load ---------------------------------
        if exits is None or str(exits).strip() == "":
            raise _bad("exits=DIR is required (an exits directory from `eetune convert` / `eetune tune`)")
        exits_dir = Path(str(exits))
        if not exits_dir.is_dir():
            raise _bad(f"exits={exits}: no such directory")
        config = ExitConfig.load(exits_dir)
        if mode not in MODES:
            raise _bad(f"mode={mode!r}: use one of {', '.join(MODES)}")
        if confidence not in CONFIDENCES:
            raise _bad(f"confidence={confidence!r}: use one of {', '.join(CONFIDENCES)}")
        threshold = None if threshold is None else _as_float("threshold", threshold)
        draft_len = _as_int("draft_len", draft_len, 1)
        if draft_exit is not None and draft_exit != "auto":
            draft_exit = _as_int("draft_exit", draft_exit, 1)
            if draft_exit not in config.exit_layers:
                raise _bad(f"draft_exit={draft_exit} is not one of the exits {list(config.exit_layers)} (or auto)")
        try:
            torch_dtype = _resolve_dtype(str(dtype))
        except EETuneError:
            raise _bad(f"dtype={dtype!r}: use fp32, bf16 or fp16") from None
        if str(logits_from).lower() in ("final", "none", str(config.num_layers)):
            self.logits_from = None
        else:
            k = _as_int("logits_from", logits_from, 1) if str(logits_from).strip().lstrip("-").isdigit() else None
            if k not in config.exit_layers:
                raise _bad(f"logits_from={logits_from!r}: give final or one of the exit layers "
                           f"{list(config.exit_layers)}")
            self.logits_from = k
        self._device = self._pick_device(device, _soft_device)
        if batch_size is None or str(batch_size).startswith("auto"):
            if batch_size is not None:
                log.info("eetune: batch_size=%s is not measured here; using %d", batch_size, DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        self._batch_size = _as_int("batch_size", batch_size, 1)
        if max_batch_size is not None:
            self._batch_size = min(self._batch_size, _as_int("max_batch_size", max_batch_size, 1))
        if max_length is not None:
            max_length = _as_int("max_length", max_length, 2)
            try:  # the base model's config.json alone (no weights): its context length
                from eetune.model.backbone import model_config
                limit = resolve_max_length(model_config(config.base_model, revision=config.revision), None,
                                           default=max_length)
            except Exception:  # noqa: BLE001 - loading the model below says what is wrong with it
                limit = max_length
            if max_length > limit:
                raise _bad(f"max_length={max_length} exceeds the model's context of {limit}: give at most {limit}")
        if trust_remote_code:
            log.warning("eetune: trust_remote_code is ignored: exits load their base model's own Transformers code")

        # --- load ------------------------------------------------------------------------------
        from eetune.model.backbone import load_tokenizer
        from eetune.model.early_exit import EarlyExitModel

        self.exits = str(exits_dir)
        self.model = EarlyExitModel.from_pretrained(exits_dir, dtype=torch_dtype, device=str(self._device))
        self.model.eval()
        self.tokenizer = load_tokenizer(self.model.backbone)
        self.decode_settings = {"mode": mode, "threshold": threshold, "confidence": confidence,
                                "draft_len": draft_len, "draft_exit": draft_exit}
        DecodeOptions(**self.decode_settings).validate(self.model)  # gates present, draft exit ... (one line)
        limit = resolve_max_length(self.model.backbone.config, self.tokenizer, default=2048)
        if max_length is not None and max_length > limit:
            raise _bad(f"max_length={max_length} exceeds the model's context of {limit}: give at most {limit}")
        self._max_length = max_length or limit
        self.dtype = torch_dtype
        self.stats = {"requests": 0, "new_tokens": 0, "exit_layer_sum": 0, "layer_token_passes": 0,
                      "drafted": 0, "accepted": 0, "seconds": 0.0, "thresholds": None, "threshold_source": None}

    # --- construction from lm-eval (model_args + the command line's batch_size / device) ------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        args = dict(arg_dict or {})
        unknown = sorted(k for k in args if k not in MODEL_ARGS and k not in HARNESS_ARGS)
        if unknown:
            hint = " (eetune takes exits=DIR: the exits directory names its base model)" \
                if "pretrained" in unknown else ""
            raise _bad(f"unknown {', '.join(unknown)}{hint}; eetune takes: "
                       + "; ".join(f"{k} = {v}" for k, v in MODEL_ARGS.items()))
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        # model_args win over the command line's --batch_size / --device (which always has a default):
        # a device that only the command line gave falls back to the CPU where it does not exist.
        soft = "device" not in args and "device" in extra
        for k in ("batch_size", "max_batch_size", "device"):
            if k in extra and k not in args:
                args[k] = extra[k]
        return cls(**args, _soft_device=soft)

    @staticmethod
    def _pick_device(device, soft: bool) -> torch.device:
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(str(device))
        except (RuntimeError, ValueError):
            raise _bad(f"device={device!r} is not a torch device: give cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            if soft:
                log.info("eetune: no CUDA device on this machine: running on the CPU (not %s)", device)
                return torch.device("cpu")
            raise _bad(f"device={device}: no CUDA device on this machine: use device=cpu")
        return dev

    # --- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        """Added to the results' `config` (lm-eval asks after evaluating): the exits and the
        decoding statistics of the generate_until requests."""
        cfg = self.model.config
        s = self.stats
        n = s["new_tokens"]
        info = {"exits": self.exits, "base_model": cfg.base_model, "exit_layers": list(cfg.exit_layers),
                "num_layers": cfg.num_layers, "arch": cfg.arch, "backbone_fingerprint": cfg.backbone_fingerprint,
                "exit_vocab": getattr(self.model, "exit_vocab", None),
                "logits_from": "final" if self.logits_from is None else self.logits_from,
                "dtype": str(self.dtype).replace("torch.", ""), **self.decode_settings,
                "generate_requests": s["requests"], "new_tokens": n,
                "mean_layers_per_token": s["exit_layer_sum"] / n if n else None,
                "layer_passes_per_token": s["layer_token_passes"] / n if n else None,
                "acceptance_rate": s["accepted"] / s["drafted"] if s["drafted"] else None,
                "thresholds_used": s["thresholds"], "threshold_source": s["threshold_source"],
                "decode_seconds": round(s["seconds"], 3)}
        from eetune.version import __version__
        info["eetune_version"] = __version__
        return {"model_num_parameters": sum(p.numel() for p in self.model.backbone.model.parameters())
                + self.model.parameter_counts()["heads"], "model_dtype": info["dtype"], "eetune": info}

    # --- tokenisation (as lm-eval's HFLM) -------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False  # the text already starts with BOS
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) log-probabilities (fp32) of the final layer or of exit `logits_from`
        (`exit_log_probs`); the trunk runs no deeper than it must (a restricted head with OTHER
        needs the final layer: it decides among the tokens outside the head's) and no other exit
        head runs."""
        from eetune.model.early_exit import positions_from_mask

        bb = self.model.backbone
        positions = positions_from_mask(mask, ids)
        h = bb.embed(ids, positions)
        ctx = bb.context(h, positions)
        if self.logits_from is None:
            return F.log_softmax(bb.logits(bb.final_norm(bb.run_layers(h, 0, bb.num_layers, ctx))).float(), -1)
        k = self.logits_from
        head = self.model.head(k)
        h = bb.run_layers(h, 0, k, ctx)
        exit_logits = head(h, ctx)
        final = None
        if head.has_other:
            final = bb.logits(bb.final_norm(bb.run_layers(h, k, bb.num_layers, ctx)))
        return exit_log_probs(head, exit_logits, final)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`requests`: ((context, continuation) or None, context ids, continuation ids)."""

        def by_length(req):  # longest first: a batch's first row sets its padded width
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=by_length, group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="eetune loglikelihood")
        for chunk in re_ord.get_batched(n=self.batch_size):
            rows = []
            for _, ctx_ids, cont_ids in chunk:
                if not ctx_ids or not cont_ids:
                    raise EETuneError("loglikelihood request with an empty context or continuation after tokenising")
                if len(cont_ids) > self.max_length:
                    raise EETuneError(f"a continuation of {len(cont_ids)} tokens is longer than the context of "
                                      f"{self.max_length} tokens (max_length): it cannot be scored")
                rows.append((ctx_ids + cont_ids)[-(self.max_length + 1):][:-1])  # left-truncated input
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            for b, r in enumerate(rows):  # right padding (masked; its positions are -1)
                ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[b, :len(r)] = 1
            logits = self._logits(ids, mask)
            for (req_str, ctx_ids, cont_ids), row, lg in zip(chunk, rows, logits):
                n = len(cont_ids)
                lp = lg[len(row) - n:len(row)].unsqueeze(0)  # (1, n, V) log-probabilities
                greedy = lp.argmax(-1)
                for rs, cont, lpc in re_ord.get_cache(req_str=req_str, cxt_toks=ctx_ids, cont_toks=cont_ids,
                                                      logits=lp):
                    cont_t = torch.tensor(cont, dtype=torch.long, device=lpc.device).unsqueeze(0)
                    is_greedy = bool((greedy[:, -cont_t.shape[1]:] == cont_t).all())
                    score = float(torch.gather(lpc[:, -cont_t.shape[1]:], 2, cont_t.unsqueeze(-1)).sum())
                    res.append((score, is_greedy))
                    if rs is not None:
                        self.cache_hook.add_partial("loglikelihood", rs, (score, is_greedy))
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from eetune.decode.api import DecodeOptions, TextStream, end_token_ids, generate

        eos_ids = end_token_ids(self.model, self.tokenizer)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        re_ord = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                          group_by="gen_kwargs", group_fn=lambda r: r[1])
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="eetune generate_until")
        for chunk in re_ord.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            gen_kwargs = all_kwargs[0]
            if not isinstance(gen_kwargs, dict):
                raise EETuneError(f"generate_until: generation kwargs must be a dict, got {gen_kwargs!r}")
            kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen = int(kw.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if max_gen < 1 or room < 1:
                raise EETuneError(f"generate_until: max_gen_toks={max_gen} leaves no room for a prompt in the "
                                  f"context of {self.max_length} tokens: lower it in the task's generation_kwargs "
                                  f"(or --gen_kwargs max_gen_toks=N)")
            sampling = {}
            if kw.pop("do_sample", False):
                t = float(kw.pop("temperature", 0.0) or 0.0)
                sampling = {"temperature": t if t > 0 else 1.0, "top_k": int(kw.pop("top_k", 0) or 0),
                            "top_p": float(kw.pop("top_p", 1.0) or 1.0)}
            opts = DecodeOptions(**self.decode_settings, **sampling, max_new_tokens=max_gen, eos_token_ids=eos_ids)
            prompts = [self.tok_encode(c, left_truncate_len=room) or [self.prefix_token_id] for c in contexts]
            streams = [TextStream(self.tokenizer, [s for s in until if s]) for _ in prompts]

            def on_tokens(b, toks, stats):  # end a row at its first stop string
                return not any(streams[b].push(t)[1] for t in toks)

            result = generate(self.model, prompts, opts, on_tokens=on_tokens)
            self._count(result)
            for context, row in zip(contexts, result.rows):
                text = postprocess_generated_text(self.tok_decode(row.ids), stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _count(self, result) -> None:
        s = self.stats
        s["requests"] += len(result.rows)
        s["new_tokens"] += result.new_tokens
        s["exit_layer_sum"] += sum(t.exit_layer for r in result.rows for t in r.tokens)
        s["layer_token_passes"] += result.layer_token_passes
        s["drafted"] += result.drafted
        s["accepted"] += result.accepted
        s["seconds"] += result.seconds
        s["thresholds"] = {str(k): t for k, t in (getattr(result, "thresholds", None) or {}).items()} or None
        s["threshold_source"] = getattr(result, "threshold_source", None) or None


# --- the command line -------------------------------------------------------------------------
LM_EVAL_SUBCOMMANDS = ("run", "ls", "validate")


def harness_argv(args: list[str]) -> list[str]:
    """lm-eval's command line arguments, with `--model eetune` added to a run that names no model
    (lm-eval's own default is `hf`)."""
    args = list(args)
    if not args or args[0] in ("ls", "validate") or any(a in ("-h", "--help") for a in args):
        return args
    named = any(a in ("--model", "-M", "--config", "-C") or a.startswith(("--model=", "--config="))
                for a in args)
    if named:
        return args
    at = 1 if args[0] == "run" else 0
    return args[:at] + ["--model", MODEL_NAME] + args[at:]


def run_harness(args: list[str]) -> None:
    """Run lm-eval's own command line (`lm_eval.__main__.cli_evaluate`) on `args`, with the
    `eetune` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *harness_argv(args)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def main(argv=None) -> int:
    """`python -m eetune.measure.lmeval ARGS`: lm-eval's command line with the `eetune` model type."""
    try:
        run_harness(list(sys.argv[1:] if argv is None else argv))
    except EETuneError as e:
        print(f"eetune lm-eval: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    # Run as a script this file is `__main__`: register (and run) the importable module's class,
    # so that `eetune` is registered once, by `eetune.measure.lmeval`.
    from eetune.measure.lmeval import main as _main
    sys.exit(_main())
elif MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(EETuneLM)
