"""Does merging a constant-learning-rate run's checkpoints replace annealing it? A small language model, on CPU.

    python scripts/lm_experiment.py --out out/lm            # the full experiment: 3 seeds
    python scripts/lm_experiment.py --out out/lm-tiny --tiny  # end to end in seconds (the test runs this)

A GPT-style model (causal self-attention blocks, a vocabulary of the 256 byte values) learns to predict the next
byte of the Python standard library's own source files (``sysconfig.get_paths()["stdlib"]``, every ``*.py`` outside
``site-packages``), which every machine with Python has. The files are split into train, validation and test by a
hash of their path (80 / 10 / 10), so no file is in two splits; each split is its files' bytes, concatenated.

For each seed:

* (a) AdamW at a constant learning rate after a linear warmup, a checkpoint every ``save_every`` steps
  (``torch.save({"model", "optimizer", "step", ...})``, a trainer's layout) into ``OUT/seed-S/constant/``;
* (b) the same run continued from (a)'s checkpoint at the start of the decay window (step T - W, optimizer state
  and batches as in (a)), the learning rate decayed linearly to zero over the last W steps: the annealed reference;
* merges of (a) ending at its last step, made by ``ckpt_ema.sweep`` and scored with its ``score=`` function: the
  uniform mean of the newest K, EMAs of several half-lives, power EMAs of several sigma_rel, and window merges
  weighted like a linear, cosine or 1-sqrt decay (``--weights``); the windows are fractions of W. The sweep
  chooses on the validation loss; every number in the tables is the test loss;
* the chosen merge applied to windows that end earlier: the stable phase seen through a merge.

"share" is (a's last - merge) / (a's last - b), in test loss: the part of annealing's improvement the merge
recovers. The mean row is the seeds' mean losses, and its share is computed from them. The picture
(``OUT/lm_merging.png``) shows the test loss of (a), (b) and the merges along the run.

A uniform mean over the last W steps is the merge counterpart of a linear decay over the same W steps: with
updates that did not depend on where they are taken, decaying the rate linearly to zero over W gives the last
iterate theta_0 + sum_j (W - j + 1) / W u_j of the W updates u_j, which is the mean of the W iterates (WSM,
arXiv 2507.17634; ckpt_ema.window_weights maps any decay shape to merge weights this way).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import ckpt_ema

if TYPE_CHECKING:
    from ckpt_ema.sweeping import Candidate

SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}  # of the files, by a hash of their path
WINDOW_FRACTIONS = (0.25, 0.5, 1.0, 2.0, 4.0)  # merge windows, as fractions of the decay window W
SIGMA_RELS = (0.03, 0.05, 0.1, 0.15, 0.2)  # power EMA widths, relative to the run's length
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")  # window merges shaped like these decays (ckpt_ema.window_weights)
# The rules compared, each with its best window (chosen on validation): what rule_of calls a candidate.
RULES = ("uniform mean", "EMA", "power EMA", *(f"{shape} window" for shape in DECAY_SHAPES))
EARLIER_END = 0.5  # the earlier merge of the table ends at this fraction of the run


@dataclass(frozen=True)
class Config:
    """The model, the run and the evaluation. ``steps`` T, ``decay_steps`` W: (b) decays over steps T-W..T."""

    d_model: int
    n_layer: int
    n_head: int
    context: int
    batch: int
    steps: int
    warmup: int
    lr: float
    weight_decay: float
    save_every: int
    decay_steps: int
    eval_windows: int  # windows of ``context`` bytes per split, evenly spaced over it
    curve_every: int  # (a)'s test loss is drawn every this many steps, the merges' every twice as many

    def __post_init__(self) -> None:
        if any(n % self.save_every for n in (self.steps, self.decay_steps, self.curve_every)):
            raise ValueError("steps, decay_steps and curve_every must be multiples of save_every: the curves and (b) "
                             "start at checkpoints")


FULL = Config(d_model=128, n_layer=4, n_head=4, context=128, batch=16, steps=1200, warmup=100, lr=3e-3,
              weight_decay=0.1, save_every=10, decay_steps=200, eval_windows=256, curve_every=100)
TINY = Config(d_model=32, n_layer=2, n_head=2, context=32, batch=8, steps=48, warmup=8, lr=1e-2,
              weight_decay=0.1, save_every=4, decay_steps=16, eval_windows=32, curve_every=8)


# ---- data ----------------------------------------------------------------------------------------------------------

def split_of(relative_path: str) -> str:
    """The split of one file: a hash of its path relative to the standard library, so the same on every machine
    with the same Python."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 100
    for name, percent in SPLIT_PERCENT.items():
        if bucket < percent:
            return name
        bucket -= percent
    raise AssertionError("the split percentages add up to 100")


def load_splits() -> dict[str, torch.Tensor]:
    """The bytes of the standard library's ``*.py`` files (outside ``site-packages``), concatenated per split in
    path order, as uint8 tensors."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {name: [] for name in SPLIT_PERCENT}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" not in relative.split("/") and path.is_file():
            parts[split_of(relative)].append(path.read_bytes())
    return {name: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) for name, chunks in parts.items()}


def train_batch(train: torch.Tensor, cfg: Config, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of update ``step``: random windows drawn from a generator seeded by (seed, step), so that (b),
    resumed at any step, sees the batches (a) saw."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch,), generator=generator)
    windows = train[starts[:, None] + torch.arange(cfg.context + 1)].long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(data: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``cfg.eval_windows`` windows of ``context + 1`` bytes evenly spaced over a split: the same for every model."""
    starts = torch.linspace(0, len(data) - cfg.context - 1, cfg.eval_windows).long()
    return data[starts[:, None] + torch.arange(cfg.context + 1)].long()


# ---- model ---------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a 4x GELU MLP, each with a residual."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (h.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for h in self.qkv(self.ln_attn(x)).split(c, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attended)
        return x + self.fc_out(F.gelu(self.fc(self.ln_mlp(x))))


class GPT(nn.Module):
    """Byte-level GPT: token and learned position embeddings, ``n_layer`` blocks, a final norm, a linear head."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tokens = nn.Embedding(256, cfg.d_model)
        self.positions = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))


def mean_loss(model: GPT, windows: torch.Tensor, batch: int = 64) -> float:
    """Cross-entropy of the next byte, in nats, averaged over every position of every window."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum").item()
    return total / (len(windows) * (windows.shape[1] - 1))


# ---- training ------------------------------------------------------------------------------------------------------

def learning_rate(cfg: Config, step: int, anneal: bool) -> float:
    """The rate of update ``step`` (1-based): linear warmup over ``warmup`` updates, then constant; annealed, the
    W updates after step T-W take lr * (T - step + 1) / W, down to lr / W for the last (zero after it)."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    decay_start = cfg.steps - cfg.decay_steps
    if anneal and step > decay_start:
        return cfg.lr * (cfg.steps - step + 1) / cfg.decay_steps
    return cfg.lr


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.pt"


def save_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer, step: int, seed: int,
                    cfg: Config) -> None:
    """A trainer's checkpoint: weights under "model", the optimizer's state, the step; written atomically."""
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seed": seed,
                "config": asdict(cfg)}, partial)
    os.replace(partial, path)


def train(cfg: Config, train_bytes: torch.Tensor, seed: int, folder: Path, resume_from: Path | None) -> None:
    """Run (a) from scratch (``resume_from`` None) or (b) from one of (a)'s checkpoints, annealed; a checkpoint
    every ``save_every`` steps into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    if resume_from is not None:
        saved = torch.load(resume_from, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
    model.train()
    while step < cfg.steps:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, anneal=resume_from is not None)
        inputs, targets = train_batch(train_bytes, cfg, seed, step)
        loss = F.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % cfg.save_every == 0:
            save_checkpoint(checkpoint_path(folder, step), model, optimizer, step, seed, cfg)


# ---- scoring and merging -------------------------------------------------------------------------------------------

class Scorer:
    """Validation and test loss of a set of weights (a ``.safetensors`` merge, a checkpoint, a state dict)."""

    def __init__(self, cfg: Config, splits: dict[str, torch.Tensor]) -> None:
        self.model = GPT(cfg)
        self.windows = {name: eval_windows(splits[name], cfg) for name in ("val", "test")}

    def losses(self, state_dict: dict[str, torch.Tensor], splits: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
        self.model.load_state_dict(state_dict)
        return {f"{name}_loss": mean_loss(self.model, self.windows[name]) for name in splits}

    def of_file(self, path: Path) -> dict[str, float]:
        """The sweep's ``score=``: a merge (or the final model) as the sweep wrote it; val first (it chooses)."""
        return self.losses(load_file(str(path)))

    def of_checkpoint(self, path: Path) -> float:
        return self.losses(torch.load(path, weights_only=True)["model"], ("test",))["test_loss"]


@dataclass(frozen=True)
class MergeGrid:
    """The sweep's candidates: ``ckpt_ema.sweep``'s arguments of the same names."""

    lasts: list[int]
    half_lives: list[float]
    sigma_rels: list[float]
    shapes: list[str]
    windows: list[int]


def merge_grid(cfg: Config) -> MergeGrid:
    """The sweep's candidates, with windows as fractions of W: the uniform mean of the newest K checkpoints
    (K * save_every = f * W steps; K >= 2, the newest alone being the final model the sweep scores anyway, and
    no more than the run saved); EMAs whose mean age matches that mean's (W f / 2 steps: half-life
    ln 2 * f * W / 2); power EMAs of widths SIGMA_RELS; and merges of the last f * W steps weighted like a
    linear, cosine or 1-sqrt decay over them (WSM; the uniform one is the mean of the newest K above)."""
    saved = cfg.steps // cfg.save_every
    lasts = sorted({k for f in WINDOW_FRACTIONS if 2 <= (k := round(f * cfg.decay_steps / cfg.save_every)) <= saved})
    half_lives = [round(math.log(2) * f * cfg.decay_steps / 2, 1) for f in WINDOW_FRACTIONS]
    windows = [round(f * cfg.decay_steps) for f in WINDOW_FRACTIONS]
    return MergeGrid(lasts, half_lives, list(SIGMA_RELS), list(DECAY_SHAPES), windows)


def sweep_merges(run: Path, outdir: Path, scorer: Scorer, cfg: Config) -> ckpt_ema.SweepResult:
    """Every merge of (a) ending at its last step, from one read, each scored; chosen on the validation loss."""
    scoring = ckpt_ema.Scoring(scorer.of_file, key="val_loss", maximize=False, label="validation loss")
    grid = merge_grid(cfg)
    result = ckpt_ema.sweep(sorted(run.glob("step_*.pt")), outdir, lasts=grid.lasts, half_lives=grid.half_lives,
                            sigma_rels=grid.sigma_rels, shapes=grid.shapes, windows=grid.windows, score=scoring,
                            key="model", plot=False, keep_state=False)
    assert result is not None  # (not watching)
    return result


def earlier_merges(run: Path, cfg: Config, options: ckpt_ema.AverageOptions, ends: list[int],
                   scorer: Scorer) -> dict[int, float]:
    """The test loss of the chosen rule's merge of (a)'s checkpoints up to each step of ``ends``; a uniform mean
    of K only where K checkpoints have been saved."""
    merged = {}
    for end in ends:
        if options.last is not None and end < options.last * cfg.save_every:
            continue
        files = [checkpoint_path(run, step) for step in range(cfg.save_every, end + 1, cfg.save_every)]
        result = ckpt_ema.average(files, options=options)
        assert result is not None
        merged[end] = scorer.losses(result.state_dict, ("test",))["test_loss"]
    return merged


# ---- one seed ------------------------------------------------------------------------------------------------------

@dataclass
class SeedResult:
    seed: int
    last: float  # (a)'s last checkpoint, test loss
    annealed: float  # (b)'s last checkpoint
    window: str  # what the merge the sweep chose on validation averages, in words
    candidates: dict[str, dict[str, float]]  # every merge: val_loss, test_loss
    rules: dict[str, str]  # candidate name -> its rule (RULES)
    curve_a: dict[int, float]  # step -> test loss
    curve_b: dict[int, float]
    curve_merge: dict[int, float]  # the chosen rule, windows ending at each step
    train_seconds: float
    merge_seconds: float
    disk: dict[str, int]  # bytes: (a)'s checkpoints, (b)'s, the sweep's merges

    @property
    def best_merge(self) -> str:
        """The merge with the lowest validation loss (the sweep's choice, or the runner-up to the final model)."""
        return min(self.candidates, key=lambda n: self.candidates[n]["val_loss"])

    def best_of(self, rule: str) -> str:
        """The rule's merge with the lowest validation loss."""
        return min((n for n in self.candidates if self.rules[n] == rule),
                   key=lambda n: self.candidates[n]["val_loss"])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def window_in_words(candidate: Candidate, cfg: Config) -> str:
    opts = candidate.plan.options
    if opts.last is not None:
        return f"uniform mean of the newest {opts.last} ({opts.last * cfg.save_every} steps)"
    if opts.weights is not None:
        return f"weights shaped like a {opts.weights} decay over the last {opts.window_steps} steps"
    return f"{candidate.family}, half-life {candidate.half_life:.0f} steps"


def rule_of(candidate: Candidate) -> str:
    """The candidate's rule (:data:`RULES`): its family, or for a window merge its decay shape."""
    opts = candidate.plan.options
    return f"{opts.weights} window" if opts.weights is not None else candidate.family


def earlier_step(cfg: Config) -> int:
    """Where the table's earlier merge ends: the checkpoint nearest EARLIER_END of the run."""
    return round(EARLIER_END * cfg.steps / cfg.save_every) * cfg.save_every


def curve_steps(cfg: Config) -> tuple[list[int], list[int], list[int]]:
    """The steps drawn: (a) every ``curve_every`` (its last scored by the sweep), (b) about ten times over its
    decay, the merges every ``2 * curve_every``, at the earlier step and at the end."""
    a_steps = list(range(cfg.curve_every, cfg.steps, cfg.curve_every))
    a_steps = sorted({*a_steps, earlier_step(cfg)} - {cfg.steps})
    b_every = max(1, round(cfg.decay_steps / 10 / cfg.save_every)) * cfg.save_every
    b_steps = list(range(cfg.steps, cfg.steps - cfg.decay_steps, -b_every))[::-1]
    merge_ends = sorted({*range(2 * cfg.curve_every, cfg.steps + 1, 2 * cfg.curve_every), earlier_step(cfg),
                         cfg.steps})
    return a_steps, b_steps, merge_ends


def run_seed(cfg: Config, splits: dict[str, torch.Tensor], seed: int, out: Path) -> SeedResult:
    """Train (a) and (b), sweep the merges of (a), score every curve."""
    folder = out / f"seed-{seed}"
    if folder.exists():
        raise SystemExit(f"{folder} exists: remove it, or give another --out")
    constant, annealed = folder / "constant", folder / "annealed"
    started = time.perf_counter()
    train(cfg, splits["train"], seed, constant, None)
    train(cfg, splits["train"], seed, annealed, checkpoint_path(constant, cfg.steps - cfg.decay_steps))
    trained = time.perf_counter()

    scorer = Scorer(cfg, splits)
    result = sweep_merges(constant, folder / "merges", scorer, cfg)
    assert result.final_scores is not None
    best = result.best or min(result.scores, key=lambda n: result.scores[n]["val_loss"])
    rule = next(c for c in result.candidates if c.name == best)
    a_steps, b_steps, merge_ends = curve_steps(cfg)
    curve_a = {s: scorer.of_checkpoint(checkpoint_path(constant, s)) for s in a_steps}
    curve_a[cfg.steps] = result.final_scores["test_loss"]  # (the same weights, scored by the sweep)
    curve_b = {s: scorer.of_checkpoint(checkpoint_path(annealed, s)) for s in b_steps}
    curve_merge = earlier_merges(constant, cfg, rule.plan.options, merge_ends, scorer)
    merged = time.perf_counter()

    return SeedResult(
        seed=seed, last=curve_a[cfg.steps], annealed=curve_b[cfg.steps],
        window=window_in_words(rule, cfg) if result.best else f"none beat (a)'s last; the best merge: {best}",
        candidates={n: dict(s) for n, s in result.scores.items()},
        rules={c.name: rule_of(c) for c in result.candidates}, curve_a=curve_a, curve_b=curve_b,
        curve_merge=curve_merge, train_seconds=trained - started, merge_seconds=merged - trained,
        disk={"(a)": folder_bytes(constant), "(b)": folder_bytes(annealed), "merges": folder_bytes(folder / "merges")})


# ---- report --------------------------------------------------------------------------------------------------------

def share(last: float, merge: float, annealed: float) -> str:
    """The part of (b)'s improvement over (a)'s last checkpoint that ``merge`` recovers, in percent."""
    if not last > annealed:
        return "n/a (b did not improve)"
    return f"{100 * (last - merge) / (last - annealed):.0f}%"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main_table(results: list[SeedResult]) -> str:
    """One row per seed and their mean: (a)'s last checkpoint, the best merge, (b), the share, the choice, cost."""
    lines = ["| seed | (a) last checkpoint | best merge | (b) annealed | share recovered | chosen on validation "
             "| train s | merge+score s | disk MB: (a) / (b) / merges |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in results:
        best = r.candidates[r.best_merge]["test_loss"]
        disk = " / ".join(f"{v / 1e6:.0f}" for v in r.disk.values())
        lines.append(f"| {r.seed} | {r.last:.4f} | {best:.4f} | {r.annealed:.4f} | {share(r.last, best, r.annealed)} "
                     f"| {r.best_merge}: {r.window} | {r.train_seconds:.0f} | {r.merge_seconds:.0f} | {disk} |")
    last, annealed = mean([r.last for r in results]), mean([r.annealed for r in results])
    best = mean([r.candidates[r.best_merge]["test_loss"] for r in results])
    lines.append(f"| mean | {last:.4f} | {best:.4f} | {annealed:.4f} | {share(last, best, annealed)} | | "
                 f"{mean([r.train_seconds for r in results]):.0f} | {mean([r.merge_seconds for r in results]):.0f} | |")
    return "\n".join(lines)


def rules_table(results: list[SeedResult], earlier: int) -> str:
    """Each rule's best merge (chosen on validation, per seed), every candidate, and the earlier window: mean test
    loss over the seeds and the share computed from the mean losses."""
    last, annealed = mean([r.last for r in results]), mean([r.annealed for r in results])
    rows = [("(a) last checkpoint", "", last), ("(b) annealed", "", annealed)]
    for rule in RULES:
        names = [r.best_of(rule) for r in results]
        rows.append((f"best {rule}", ", ".join(names),
                     mean([r.candidates[n]["test_loss"] for r, n in zip(results, names)])))
    for name in sorted(results[0].candidates, key=lambda n: RULES.index(results[0].rules[n])):
        rows.append((name, "", mean([r.candidates[name]["test_loss"] for r in results])))
    lines = ["| merge of (a) | chosen per seed | mean test loss | share recovered |", "|---|---|---:|---:|"]
    lines += [f"| {label} | {names} | {loss:.4f} | {share(last, loss, annealed)} |" for label, names, loss in rows]
    lines.append(f"| (a) checkpoint at step {earlier} (stable phase) | | {mean([r.curve_a[earlier] for r in results]):.4f} | |")
    if all(earlier in r.curve_merge for r in results):
        at_merge = f"{mean([r.curve_merge[earlier] for r in results]):.4f}"
    else:
        at_merge = "n/a (a chosen window is longer than the run so far)"
    lines.append(f"| chosen merge, window ending at step {earlier} | | {at_merge} | |")
    return "\n".join(lines)


def draw(results: list[SeedResult], cfg: Config, path: Path) -> None:
    """Test loss along the run, one panel per seed: (a) every few checkpoints, (b) from the decay's start, the
    chosen merge at windows ending along the run, and each rule's best merge at the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), sharey=True, squeeze=False)
    start = cfg.steps // 4
    for ax, r in zip(axes[0], results):
        a = {s: v for s, v in sorted(r.curve_a.items()) if s >= start}
        m = {s: v for s, v in sorted(r.curve_merge.items()) if s >= start}
        ax.plot(list(a), list(a.values()), color="tab:gray", lw=1.2, label="(a) constant LR")
        ax.plot(list(r.curve_b), list(r.curve_b.values()), color="tab:red", lw=1.6, label="(b) annealed")
        ax.plot(list(m), list(m.values()), color="tab:blue", lw=1.6, marker="o", ms=3,
                label=f"merge of (a) ending there: {r.best_merge}")
        for i, (rule, marker) in enumerate(zip(RULES, "s^Dvo*")):  # side by side at the last step
            name = r.best_of(rule)
            ax.plot([cfg.steps * (1 + (i - 2.5) / 150)], [r.candidates[name]["test_loss"]], marker=marker, ls="",
                    ms=6, mfc="none", label=f"best {rule}: {name}")
        ax.axvline(cfg.steps - cfg.decay_steps, color="tab:red", lw=0.6, ls=":")
        ax.set_title(f"seed {r.seed}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
    axes[0][0].set_ylabel("test loss (nats per byte)")
    lows = [min(min(r.curve_b.values()), *(c["test_loss"] for c in r.candidates.values())) for r in results]
    highs = [max(v for s, v in r.curve_a.items() if s >= cfg.steps // 2) for r in results]
    axes[0][0].set_ylim(min(lows) - 0.02, max(highs) + 0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/lm"), help="folder for the runs, merges and picture")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="a toy size that runs end to end in seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else FULL
    started, cpu_started = time.perf_counter(), time.process_time()
    splits = load_splits()
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    print(f"data: {', '.join(f'{k} {len(v) / 1e6:.2f} MB' for k, v in splits.items())}; model {n_params / 1e6:.2f} M "
          f"parameters; {cfg.steps} steps of {cfg.batch} x {cfg.context} bytes, lr {cfg.lr:g}, warmup {cfg.warmup}, "
          f"checkpoint every {cfg.save_every}; (b) decays over steps {cfg.steps - cfg.decay_steps}-{cfg.steps}",
          flush=True)
    results = []
    for seed in args.seeds:
        results.append(run_seed(cfg, splits, seed, args.out))
        r = results[-1]
        print(f"seed {seed}: (a) {r.last:.4f}, (b) {r.annealed:.4f}, best merge {r.best_merge} "
              f"{r.candidates[r.best_merge]['test_loss']:.4f} ({time.perf_counter() - started:.0f} s so far)",
              flush=True)
    earlier = earlier_step(cfg)
    print("\nTest loss (nats per byte); the merges are chosen on the validation loss.\n")
    print(main_table(results))
    print()
    print(rules_table(results, earlier))
    picture = args.out / "lm_merging.png"
    draw(results, cfg, picture)
    print(f"\n{len(results)} seeds in {time.perf_counter() - started:.0f} s on {args.threads} threads "
          f"({time.process_time() - cpu_started:.0f} s of CPU); "
          f"disk {folder_bytes(args.out) / 1e6:.0f} MB in {args.out}; picture {picture}")


if __name__ == "__main__":
    main()
