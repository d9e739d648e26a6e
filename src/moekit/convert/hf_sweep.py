"""Sweep every MoE architecture of the installed transformers through moekit (tests and docs/hf_architectures.md).

An architecture is in the sweep when its ``modeling_*.py`` uses ``@use_experts_implementation`` (found by scanning
the installed sources, so a new architecture in a future transformers appears by itself). Each one is built from a
tiny random config derived here (generic small sizes filtered to the config's own fields, plus a few per-architecture
overrides in :data:`OVERRIDES`) and checked, in float32 on CPU:

- the experts route: logits of ``experts_implementation="moekit"`` against ``"eager"`` (max abs error), the gradients
  of every parameter after one backward pass, and greedy tokens of ``generate``;
- the full-swap route (:func:`moekit.convert.swap_hf_moe`): logits and greedy tokens, or the reason it does not apply.

An architecture that cannot be built on CPU is reported with the reason; none is dropped silently.
``python -m moekit.convert.hf_sweep`` prints the markdown table of docs/hf_architectures.md.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import pathlib
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TOL_LOGITS = 1e-5  # float32, max abs error of logits against eager
TOL_GRAD = 1e-5  # float32, max abs gradient error relative to max(1, max |grad|)
SEQ, BATCH, NEW_TOKENS = 8, 2, 3

# Generic tiny sizes; each is applied only when the config class has a field of that name.
TINY: dict[str, Any] = {
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
    "max_position_embeddings": 64, "initializer_range": 0.05,
    "num_local_experts": 8, "num_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "top_k_experts": 2, "moe_k": 2, "moe_topk": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_start_index": 0,
    "n_shared_experts": 1, "shared_expert_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "sliding_window": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
}
# Per-architecture additions / corrections to TINY (model-type folder name -> kwargs).
OVERRIDES: dict[str, dict[str, Any]] = {
    # Kolibri-1.1: NVFP4 key/value rounding needs head_dim % 16 == 0; one indexer head per key head
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 1, "index_topk": 8, "index_pool_size": 16,
                   "index_compression": 2, "index_num_local_tokens": 4, "index_num_sink_tokens": 1},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    "zaya": {"num_experts_per_tok": 1},  # the config accepts top-1 only
    "gemma4": {"enable_moe_block": True, "vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 8},
    "glm5_next": {"qk_rope_head_dim": 0, "qk_nope_head_dim": 16},  # its DSA layers are NoPE
    "glm4v_moe": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0]}},
    "hy_v4_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
    "granitemoehybrid": {"mamba_n_heads": 4, "layer_types": ["linear_attention", "full_attention"]},
    "mimo_v2_flash": {"num_key_value_heads": 2},
    "ernie4_5_vl_moe": {"moe_intermediate_size": [16, 16],  # (text, vision) expert widths
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}},
    "lfm2_moe": {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]},
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "inkling2": {"unpadded_vocab_size": 96},
    "inkling2_loop": {"unpadded_vocab_size": 96},
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                  "indexer_compress_ratio": 2},
}
# Architectures known not to build or run on CPU: folder name -> reason (still listed in the results).
NOT_ON_CPU: dict[str, str] = {}


@dataclass
class Result:
    arch: str  # folder under transformers/models
    status: str = "ok"  # ok | fail | not built
    reason: str = ""
    model_class: str = ""
    experts_class: str = ""
    logits_err: float | None = None
    grad_err: float | None = None
    tokens_same: bool | None = None
    swap: str = ""  # ok | fail | n/a + reason
    swap_err: float | None = None
    swap_tokens_same: bool | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def experts_exact(self) -> bool:
        return (
            self.status == "ok" and self.logits_err is not None and self.logits_err <= TOL_LOGITS
            and self.grad_err is not None and self.grad_err <= TOL_GRAD and self.tokens_same is not False
        )


def discover() -> list[str]:
    """Folders of ``transformers.models`` whose modeling file uses ``@use_experts_implementation`` (sorted)."""
    import transformers.models  # noqa: PLC0415

    root = pathlib.Path(transformers.models.__file__).parent
    found = []
    for f in sorted(root.glob("*/modeling_*.py")):
        if "@use_experts_implementation" in f.read_text(encoding="utf-8"):
            found.append(f.parent.name)
    return sorted(set(found))


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def _modeling(arch: str) -> Any:
    return importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")


def _pick_model_class(mod: Any) -> type:
    """A text-only class with a LM head if there is one, else a text base model, else whatever the file offers."""
    from transformers import PreTrainedModel  # noqa: PLC0415

    classes = [
        c for c in vars(mod).values()
        if isinstance(c, type) and issubclass(c, PreTrainedModel) and c.__module__ == mod.__name__
        and getattr(c, "config_class", None) is not None and not c.__name__.endswith("PreTrainedModel")
    ]

    def leaf(c: type) -> bool:
        return not getattr(c.config_class, "sub_configs", None)

    def rank(c: type) -> tuple:
        n = c.__name__
        return (
            not leaf(c), not n.endswith("ForCausalLM"), "Talker" in n or "Vision" in n or "Audio" in n,
            not n.endswith("Model"), len(n),
        )

    if not classes:
        raise LookupError("no PreTrainedModel class in the modeling file")
    return sorted(classes, key=rank)[0]


def tiny_config(arch: str, config_class: type) -> Any:
    """``config_class`` with the TINY sizes (and the OVERRIDES of ``arch``) that it has fields for. Per-layer kind
    lists of the default config (``layer_types``, ``mlp_layer_types``, ...) are cut to the tiny depth keeping every
    kind once, so a hybrid keeps an attention layer and a dense-then-sparse model keeps an MoE layer."""
    names = _fields(config_class)
    attr_map = getattr(config_class, "attribute_map", {}) or {}
    kw: dict[str, Any] = {}
    for k, v in {**TINY, **OVERRIDES.get(arch, {})}.items():
        k2 = k if k in names else attr_map.get(k)
        if k2 in names and k2 not in kw:
            kw[k2] = v
    n = kw.get("num_hidden_layers")
    try:
        default = config_class()
    except Exception:  # noqa: BLE001 (a config without usable defaults: no per-layer lists to cut)
        default = None
    n0 = getattr(default, "num_hidden_layers", None)
    if n is not None and isinstance(n0, int):
        lists = {
            name: v for name in sorted(names - kw.keys())
            if isinstance(v := getattr(default, name, None), list) and len(v) == n0 and len(set(map(str, v))) > 1
            and all(isinstance(t, str) for t in v)
        }
        n = max([n] + [len(set(v)) for v in lists.values()])
        kw["num_hidden_layers"] = n
        for name, v in lists.items():
            kw[name] = _cut_pattern(v, n)
    return config_class(**kw)


def _cut_pattern(types: list, n: int) -> list:
    """The first ``n`` entries, but with every distinct kind kept once (a hybrid model keeps its full attention)."""
    kinds = list(dict.fromkeys(types))
    if len(kinds) >= n:
        return kinds[:n]
    out = list(kinds)
    for t in types:
        if len(out) == n:
            break
        out.append(t)
    return sorted(out, key=types.index)


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    o = model(input_ids=ids, use_cache=False)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _forward_backward(model: nn.Module, ids: torch.Tensor, probe: torch.Tensor | None) -> tuple:
    model.zero_grad(set_to_none=True)
    y = _out(model, ids)
    if probe is None:
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * probe).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads, probe


def _grad_err(g_ref: dict, g: dict) -> float:
    if g_ref.keys() != g.keys():
        missing = sorted(g_ref.keys() ^ g.keys())
        raise AssertionError(f"gradients on different parameters: {missing[:4]}")
    scale = max([1.0] + [float(t.abs().max()) for t in g_ref.values() if t.numel()])
    return max(_max_err(g_ref[k], g[k]) for k in g_ref) / scale


def _generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    has_head = getattr(model, "lm_head", None) is not None or "ForCausalLM" in type(model).__name__
    if not hasattr(model, "generate") or not has_head:
        return None
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=0,
    )
    return out[:, ids.shape[1]:]


def run_arch(arch: str, swap: bool = True) -> Result:
    import moekit.convert  # noqa: F401,PLC0415  (registers "moekit")

    r = Result(arch)
    t0 = time.perf_counter()
    try:
        if arch in NOT_ON_CPU:
            r.status, r.reason = "not built", NOT_ON_CPU[arch]
            return r
        try:
            mod = _modeling(arch)
            cls = _pick_model_class(mod)
            r.model_class = cls.__name__
            cfg = tiny_config(arch, cls.config_class)
            torch.manual_seed(0)
            model = cls._from_config(cfg, experts_implementation="eager").eval()
        except Exception as e:  # noqa: BLE001 (reported, never swallowed: the result says why)
            r.status, r.reason = "not built", _why(e)
            return r
        experts = _experts_modules(model)
        if not experts:
            r.status, r.reason = "not built", "the tiny config builds no @use_experts_implementation module"
            return r
        r.experts_class = type(experts[0]).__name__
        vocab = getattr(model.config.get_text_config(), "vocab_size", 96) or 96
        ids = torch.randint(3, min(vocab, 96), (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

        y_ref, g_ref, probe = _forward_backward(model, ids, None)
        tok_ref = _generate(model, ids)
        calls = []
        hooks = [
            m.register_forward_pre_hook(lambda m, a: calls.append(m.config._experts_implementation)) for m in experts
        ]
        model.set_experts_implementation("moekit")
        y, g, _ = _forward_backward(model, ids, probe)
        tok = _generate(model, ids)
        for h in hooks:
            h.remove()
        if not calls or set(calls) != {"moekit"}:
            raise AssertionError(f"experts modules did not run through moekit (saw {sorted(set(calls))})")
        r.logits_err = _max_err(y_ref, y)
        r.grad_err = _grad_err(g_ref, g)
        r.tokens_same = None if tok_ref is None else bool(torch.equal(tok_ref, tok))
        model.set_experts_implementation("eager")
        if not r.experts_exact:
            r.status = "fail"
            r.reason = f"logits err {r.logits_err:.2e}, grad err {r.grad_err:.2e}, tokens same {r.tokens_same}"
        if swap:
            _check_swap(r, model, ids, y_ref, tok_ref)
    except Exception as e:  # noqa: BLE001
        r.status, r.reason = "fail", _why(e)
    finally:
        r.seconds = time.perf_counter() - t0
    return r


def _check_swap(r: Result, model: nn.Module, ids: torch.Tensor, y_ref: torch.Tensor, tok_ref: Any) -> None:
    from moekit.convert import swap_hf_moe  # noqa: PLC0415

    m2 = copy.deepcopy(model)
    try:
        swap_hf_moe(m2)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        r.swap = "n/a: " + re.sub(r"\s+", " ", msg)[:120]
        return
    try:
        with torch.no_grad():
            y = _out(m2, ids)
        r.swap_err = _max_err(y_ref, y)
        tok = _generate(m2, ids)
        r.swap_tokens_same = None if tok_ref is None else bool(torch.equal(tok_ref, tok))
        r.swap = "ok" if r.swap_err <= TOL_LOGITS and r.swap_tokens_same is not False else "fail"
    except Exception as e:  # noqa: BLE001
        r.swap = f"fail: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def _why(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return re.sub(r"\s+", " ", f"{type(e).__name__}: {' '.join(lines[:2])}")[:220]


def sweep(archs: list[str] | None = None, swap: bool = True) -> list[Result]:
    return [run_arch(a, swap=swap) for a in (archs or discover())]


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"


def markdown(results: list[Result]) -> str:
    def yn(b: bool | None) -> str:
        return "n/a (no LM head)" if b is None else ("yes" if b else "NO")

    rows = [
        "| architecture | model class built | experts route (`\"moekit\"`) | max logits err | max grad err (rel) "
        "| greedy tokens identical | full swap (`swap_hf_moe`) | swap logits err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status == "not built":
            rows.append(f"| {r.arch} | not built on CPU | {r.reason.replace('|', '/')} | | | | | |")
            continue
        route = "exact" if r.experts_exact else f"FAIL: {r.reason.replace('|', '/')}"
        rows.append(
            f"| {r.arch} | {r.model_class} | {route} | {_fmt(r.logits_err)} | {_fmt(r.grad_err)} | {yn(r.tokens_same)} "
            f"| {r.swap.replace('|', '/')} | {_fmt(r.swap_err)} |"
        )
    n_ok = sum(r.experts_exact for r in results)
    n_swap = sum(r.swap == "ok" for r in results)
    n_nb = sum(r.status == "not built" for r in results)
    rows.append("")
    rows.append(
        f"{len(results)} architectures; experts route exact on {n_ok}; full swap exact on {n_swap}; "
        f"{n_nb} not built on CPU."
    )
    return "\n".join(rows)


BEGIN, END = "<!-- sweep table: generated by python -m moekit.convert.hf_sweep --doc -->", "<!-- end sweep table -->"


def write_doc(path: str, table: str) -> None:
    """Replace the generated table of ``path`` (between the BEGIN/END markers) with ``table``."""
    p = pathlib.Path(path)
    text = p.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: missing the sweep table markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    p.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m moekit.convert.hf_sweep [--doc PATH] [ARCH ...]``: run the sweep, print (or write) the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    doc = None
    if "--doc" in argv:
        i = argv.index("--doc")
        doc = argv[i + 1] if i + 1 < len(argv) else "docs/hf_architectures.md"
        del argv[i:i + 2]
    results = []
    for a in (argv or discover()):
        r = run_arch(a)
        print(f"{a}: {r.status} {r.reason} err={_fmt(r.logits_err)} grad={_fmt(r.grad_err)} tok={r.tokens_same} "
              f"swap={r.swap} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)
        results.append(r)
    table = markdown(results)
    print(table)
    if doc is not None:
        import transformers  # noqa: PLC0415

        versions = f"transformers {transformers.__version__}, torch {torch.__version__}, float32 on CPU."
        write_doc(doc, f"{versions}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
