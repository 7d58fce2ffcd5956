"""Pretraining the toy model from scratch: plain torch, AdamW, warm-up + cosine, bf16 autocast.

The schedule runs on tokens seen, not on time, so a build is deterministic from its seed whatever the
machine's speed; ``max_minutes`` only caps the wall time (a build stopped by it says so in its record).

The stopping rule: training ends at the token budget, or earlier at the first periodic eval whose greedy ID
pass@1 reaches ``target_id_accuracy``. That eval reads ID *train* questions of a seed of its own (never the
test split; neither split is ever pretraining text, see ``imm_ray.data.toy.bucket``). In the world of
``imm_ray.data.toy`` the ID form is rare in the mixture and fights the OOD forms' reading of "more", so
greedy ID accuracy rises late (~0% until ~3.4M tokens, measured) and then plateaus (20-35% from 3.6M to 6M
tokens on seed 0): the shipped base trains its whole 6M-token budget and is partly competent in-domain.

Continued pretraining (``init``): a build may start from an existing toy folder (its tokenizer and weights)
instead of from scratch, and train ``tokens`` more on its own mixture, with its own warm-up and cosine. Its
document stream is seeded apart from a from-scratch build of the same seed (:data:`CONTINUED_STREAM`), it
draws from the same pretraining buckets (so never a toy train or test question), and the record keeps the
parent's folder, weights hash and whole build record, so a chain of builds can be traced back to scratch.

The folder is written to a temporary sibling and renamed into place, so an interrupted build never leaves
a half-written model where the run expects one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2ForCausalLM

from imm_ray.data.toy import ID_SET, TOY_SETS, ToyMixture, load_toy, pretraining_documents
from imm_ray.toy.check import Accuracy, SamplingSpec, check_accuracy
from imm_ray.toy.model import ToyModelSpec, qwen2_config
from imm_ray.toy.tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer

RECORD_NAME = "toy_build.json"
# The periodic eval's questions: ID train questions of this data seed (runs use seed 0 by default).
QUICK_EVAL_SEED = 9_999
# A continued build's document stream is pretraining_documents(seed + CONTINUED_STREAM): not the stream its
# parent (a from-scratch build of the same seed) already trained on.
CONTINUED_STREAM = 7_000_003


@dataclass(frozen=True)
class MeasureSpec:
    """What the finished build is measured on (recorded in the build record).

    ``test_questions`` per set for pass@1, ``train_questions`` of the ID train split for coverage at k.
    """

    test_questions: int = 200
    train_questions: int = 200
    sampling: SamplingSpec = SamplingSpec(samples=4, temperature=0.6)
    data_seed: int = 0


@dataclass(frozen=True)
class PretrainSpec:
    """Everything a build depends on; the record stores it, so a build can be repeated exactly."""

    seed: int = 0
    tokens: int = 6_000_000
    max_minutes: float | None = None
    batch_size: int = 32
    lr: float = 2e-3
    final_lr_ratio: float = 0.1
    warmup_tokens: int = 200_000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True
    device: str = "cpu"
    vocab_size: int = DEFAULT_VOCAB_SIZE
    tokenizer_documents: int = 5000
    eval_every_tokens: int = 200_000
    eval_from_tokens: int = 1_000_000
    eval_questions: int = 64
    target_id_accuracy: float | None = 0.4
    init: str | None = None  # continued pretraining: the toy folder to start from (tokenizer and weights)
    model: ToyModelSpec = ToyModelSpec()
    mixture: ToyMixture = ToyMixture()
    measure: MeasureSpec = field(default_factory=MeasureSpec)

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("tokens, batch_size and lr must be positive")
        if self.target_id_accuracy is not None and not 0 < self.target_id_accuracy <= 1:
            raise ValueError(f"target_id_accuracy must be in (0, 1], got {self.target_id_accuracy}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")


@dataclass(frozen=True)
class BuildRecord:
    """What a build did and what it measured; written as JSON next to the model."""

    spec: PretrainSpec
    parameters: int
    steps: int
    tokens_seen: int
    wall_seconds: float
    measure_seconds: float
    stopped_by: str
    final_loss: float
    evals: tuple[tuple[int, float], ...]
    accuracies: tuple[Accuracy, ...]
    id_train_coverage: Accuracy | None
    parent: dict | None = None  # continued pretraining: the parent's folder, weights sha256 and build record


def _lr_at(spec: PretrainSpec, tokens_seen: int) -> float:
    """Linear warm-up, then cosine from ``lr`` down to ``final_lr_ratio * lr`` at the token budget."""
    if tokens_seen < spec.warmup_tokens:
        return spec.lr * (tokens_seen + 1) / spec.warmup_tokens
    progress = min(1.0, (tokens_seen - spec.warmup_tokens) / max(1, spec.tokens - spec.warmup_tokens))
    floor = spec.final_lr_ratio
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(
    documents: Iterator[str], tokenizer: PreTrainedTokenizerFast, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask, labels) batches, each document ending in end-of-text."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    while True:
        encoded = tokenizer(list(itertools.islice(documents, batch_size)))["input_ids"]
        rows = [ids + [eos] for ids in encoded]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        yield ids, mask, ids.masked_fill(mask == 0, -100)


def _optimizer(model: torch.nn.Module, spec: PretrainSpec) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95))


def _new_model(spec: PretrainSpec) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Tokenizer trained on the seed's own documents, then a freshly initialised model."""
    documents = pretraining_documents(spec.seed + 1_000_003, spec.mixture)
    tokenizer = train_tokenizer(itertools.islice(documents, spec.tokenizer_documents), spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(qwen2_config(spec.model, tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=96
    )
    return model.to(spec.device), tokenizer


def _check_shape(model: Qwen2ForCausalLM, spec: ToyModelSpec, folder: Path) -> None:
    """A continued build trains the parent's shape; a spec asking for another one is an error, not a resize."""
    config = model.config
    found = {
        "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size, "max_positions": config.max_position_embeddings,
        # transformers 5 keeps rope_theta in rope_parameters; older versions as an attribute
        "rope_theta": (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None)),
    }
    for name, value in found.items():
        if getattr(spec, name) != value:
            raise ValueError(f"{folder}: the parent has model.{name} = {value}, the spec asks for {getattr(spec, name)}")


def _parent_model(spec: PretrainSpec) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast, dict]:
    """The parent folder's model (float32, on the spec's device) and tokenizer, and what the record keeps of it."""
    folder = Path(spec.init or "")
    weights, parent_record = folder / "model.safetensors", folder / RECORD_NAME
    for needed in (folder / "config.json", folder / "tokenizer.json", weights, parent_record):
        if not needed.is_file():
            raise ValueError(f"--init {folder}: {needed.name} is missing (a folder written by `imm-ray toy build`)")
    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    _check_shape(model, spec.model, folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    torch.manual_seed(spec.seed)
    parent = {
        "folder": str(folder.resolve()),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "record": json.loads(parent_record.read_text()),
    }
    return model.to(spec.device), tokenizer, parent


def training_documents(spec: PretrainSpec) -> Iterator[str]:
    """The document stream a build trains on: from scratch the seed's own, continued a stream of its own."""
    return pretraining_documents(spec.seed + (CONTINUED_STREAM if spec.init else 0), spec.mixture)


def _quick_eval(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, spec: PretrainSpec) -> float:
    """Greedy ID pass@1 on a few train questions: the progress signal and the stopping rule."""
    problems = load_toy(ID_SET, "train", spec.eval_questions, QUICK_EVAL_SEED)
    model.eval()
    greedy = SamplingSpec(samples=1, temperature=0.0, max_new_tokens=48)
    accuracy = check_accuracy(model, tokenizer, problems, greedy)
    model.train()
    return accuracy.pass_at_1


def _train(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, spec: PretrainSpec, progress: Progress
) -> tuple[int, int, str, float, list[tuple[int, float]]]:
    """The loop; returns steps, tokens seen, what stopped it, the last loss and the periodic evals."""
    optimizer = _optimizer(model, spec)
    batches = _batches(training_documents(spec), tokenizer, spec.batch_size)
    task = progress.add_task("pretrain", total=spec.tokens, info="")
    started = time.monotonic()
    steps, seen, loss_value, next_eval = 0, 0, float("nan"), spec.eval_from_tokens
    evals: list[tuple[int, float]] = []
    model.train()
    while seen < spec.tokens:
        if spec.max_minutes is not None and time.monotonic() - started > spec.max_minutes * 60:
            return steps, seen, "time", loss_value, evals
        ids, mask, labels = (t.to(spec.device) for t in next(batches))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(spec, seen)
        with torch.autocast(device_type=torch.device(spec.device).type, dtype=torch.bfloat16, enabled=spec.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps, seen, loss_value = steps + 1, seen + int(mask.sum()), loss.item()
        rate = seen / max(1e-9, time.monotonic() - started)
        progress.update(task, completed=min(seen, spec.tokens), info=f"loss {loss_value:.3f}  {rate:,.0f} tok/s")
        if seen >= next_eval:
            evals.append((seen, _quick_eval(model, tokenizer, spec)))
            progress.console.print(f"tokens {seen:,}: loss {loss_value:.3f}, ID greedy pass@1 {evals[-1][1]:.1%}")
            progress.console.file.flush()  # a redirected build log shows each eval as it happens
            next_eval += spec.eval_every_tokens
            if spec.target_id_accuracy is not None and evals[-1][1] >= spec.target_id_accuracy:
                return steps, seen, "target", loss_value, evals
    return steps, seen, "tokens", loss_value, evals


def measure(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, spec: MeasureSpec
) -> tuple[tuple[Accuracy, ...], Accuracy]:
    """Each toy set's test pass@1, and the ID train coverage at k = ``spec.sampling.samples``."""
    model.eval()
    tests = tuple(
        check_accuracy(model, tokenizer, load_toy(name, "test", spec.test_questions, spec.data_seed), spec.sampling)
        for name in TOY_SETS
    )
    train = check_accuracy(
        model, tokenizer, load_toy(ID_SET, "train", spec.train_questions, spec.data_seed), spec.sampling
    )
    return tests, train


def _save_atomically(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, record: BuildRecord, out: Path, overwrite: bool
) -> None:
    """Write everything to a temporary sibling of ``out``, then swap it in with renames."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.to("cpu").save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / RECORD_NAME).write_text(json.dumps(asdict(record), indent=2) + "\n")
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
            retired = out.with_name(f".{out.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_toy(spec: PretrainSpec, out: Path, overwrite: bool = False, show_progress: bool = True) -> BuildRecord:
    """Train the tokenizer and the model (or continue ``spec.init``), measure the result and write ``out``."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    if spec.init is not None and Path(spec.init).resolve() == out.resolve():
        raise ValueError(f"--init {spec.init} is the output folder; write the continued build elsewhere")
    started = time.monotonic()
    parent = None
    if spec.init is None:
        model, tokenizer = _new_model(spec)
    else:
        model, tokenizer, parent = _parent_model(spec)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, disable=not show_progress) as progress:
        steps, seen, stopped_by, loss, evals = _train(model, tokenizer, spec, progress)
    wall = time.monotonic() - started
    tests, train = measure(model, tokenizer, spec.measure)
    measured = time.monotonic() - started - wall
    record = BuildRecord(
        spec=spec, parameters=sum(p.numel() for p in model.parameters()), steps=steps, tokens_seen=seen,
        wall_seconds=round(wall, 1), measure_seconds=round(measured, 1), stopped_by=stopped_by, final_loss=loss, evals=tuple(evals),
        accuracies=tests, id_train_coverage=train, parent=parent,
    )
    _save_atomically(model, tokenizer, record, out, overwrite)
    return record
